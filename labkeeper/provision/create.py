"""Create a guest: an LXC from its template, a QEMU guest as a clone of a template.

The inventory's vmid is authoritative: creation checks it is free
(``/cluster/nextid?vmid=``) and PVE refuses a vmid that exists, so two creations
racing for one vmid cannot both succeed (the loser raises :class:`VmidTaken`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from labkeeper import proxmox as px
from labkeeper.errors import ServiceError
from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.desired import desired_config, desired_tags
from labkeeper.provision.errors import ProvisionError, VmidTaken
from labkeeper.provision.steps import StepResult, is_ours, lookup, wait_task
from labkeeper.secrets import resolve

logger = logging.getLogger(__name__)


def public_key_of(key_ref: str) -> str:
    """The OpenSSH public key line of a private key reference (public keys are no secret)."""
    from labkeeper.ssh import load_private_key

    key = load_private_key(resolve(key_ref).get_secret_value())
    return f"{key.get_name()} {key.get_base64()}"


def ssh_public_keys(inv: Inventory, guest: Guest) -> str | None:
    """Keys to authorise on a new container: the guest's SSH key (its public half)."""
    ref = (guest.ssh.key if guest.ssh and guest.ssh.key else None) or inv.ssh.key
    if guest.ssh is None or ref is None:
        return None
    return public_key_of(ref)


def create_request(inv: Inventory, guest: Guest) -> px.ApiRequest:
    """The LXC create request (pure apart from deriving the public key)."""
    managed = inv.settings.provision.managed_tag
    want = desired_config(guest, managed)
    r = guest.resources
    options = {k: v for k, v in want.items()
               if k not in ("hostname", "cores", "memory", "swap", "tags", "onboot")
               and not (k.startswith("net") and k[3:].isdigit()) and k != "features"}
    return px.create_lxc_request(
        guest.node, guest.vmid, guest.template or "", hostname=guest.name,
        rootfs=f"{r.storage}:{r.disk_gb}", memory=r.memory_mb, swap=r.swap_mb, cores=r.cores,
        net={i: want[f"net{i}"] for i in range(len(guest.network))},
        unprivileged=guest.unprivileged, features=want.get("features"), pool=guest.pool,
        tags=want["tags"], onboot=guest.onboot, ssh_public_keys=ssh_public_keys(inv, guest),
        options=options)


def create_guest(api: Any, inv: Inventory, guest: Guest) -> StepResult:
    """Create the guest (LXC from its template, QEMU as a clone), unless it exists.

    Check, then change: a guest of ours with this vmid already there is
    ``unchanged`` (a rerun after a crash); one that is not ours raises
    :class:`VmidTaken`. The vmid is checked free first (``/cluster/nextid``);
    PVE itself refuses to create an existing vmid, so a race has one winner.
    """
    started = time.monotonic()
    managed = inv.settings.provision.managed_tag
    found = lookup(api, guest)
    if found is not None:
        if is_ours(found, guest, managed):
            return StepResult(guest.name, "create", "unchanged",
                              f"{found.type} {guest.vmid} already exists on {found.node}")
        raise VmidTaken(f"{guest.name}: vmid {guest.vmid} is taken by {found.type} "
                        f"{found.name!r} on {found.node} (not labkeeper's)")
    try:
        px.next_vmid(api, guest.vmid)
    except ServiceError as exc:
        if exc.status == 400:
            raise VmidTaken(f"{guest.name}: vmid {guest.vmid} is not free: {exc}") from None
        raise
    if guest.type == "lxc":
        detail = _create_lxc(api, inv, guest)
    else:
        detail = _clone_qemu(api, inv, guest)
    return StepResult(guest.name, "create", "changed", detail, time.monotonic() - started)


def _create_lxc(api: Any, inv: Inventory, guest: Guest) -> str:
    _check_template(api, guest)
    req = create_request(inv, guest)
    logger.info("%s: creating LXC %s on %s from %s", guest.name, guest.vmid, guest.node,
                guest.template)
    upid = _start_creation(api, guest, req)
    wait_task(api, upid, inv)
    return f"created LXC {guest.vmid} from {guest.template}"


def _clone_qemu(api: Any, inv: Inventory, guest: Guest) -> str:
    tvmid = guest.template_vmid or 0
    tmpl = px.find_guest(api, tvmid)
    if tmpl is None or not tmpl.template:
        raise ProvisionError(f"{guest.name}: template vmid {tvmid} is not a QEMU template")
    req = px.clone_qemu_request(
        tmpl.node, tvmid, guest.vmid, name=guest.name, full=guest.full_clone,
        target=guest.node if guest.node != tmpl.node else None,
        storage=guest.resources.storage if guest.full_clone else None, pool=guest.pool)
    logger.info("%s: cloning QEMU template %s into %s on %s", guest.name, tvmid, guest.vmid,
                guest.node)
    upid = _start_creation(api, guest, req)
    wait_task(api, upid, inv)
    # tag it at once: from here on it is recognisably ours (crash-safety)
    px.configure(api, guest.node, guest.vmid, "qemu",
                 {"tags": desired_tags(guest, inv.settings.provision.managed_tag)})
    if guest.cloud_init and guest.cloud_init.password:
        px.configure(api, guest.node, guest.vmid, "qemu", {
            "cipassword": resolve(guest.cloud_init.password).get_secret_value()})
    return f"cloned QEMU template {tvmid} ({'full' if guest.full_clone else 'linked'})"


def _start_creation(api: Any, guest: Guest, req: px.ApiRequest) -> px.Upid:
    try:
        return px.parse_upid(str(px.send(api, req)))
    except ServiceError as exc:
        if "already exists" in str(exc):
            raise VmidTaken(f"{guest.name}: vmid {guest.vmid} was taken meanwhile: "
                            f"{exc}") from None
        raise


def _check_template(api: Any, guest: Guest) -> None:
    storage = guest.template_storage or ""
    vols = px.storage_content(api, guest.node, storage, content="vztmpl")
    names = sorted(v.volid for v in vols)
    if guest.template not in names:
        raise ProvisionError(
            f"{guest.name}: template {guest.template} not found in storage {storage!r} on "
            f"{guest.node}; templates there: {', '.join(names) or 'none'}")
