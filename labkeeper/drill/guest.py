"""Guest drill: restore a guest's newest vzdump archive to an isolated scratch copy and
prove it comes up.

1. Sweep the scratch copies dead drills left (:mod:`labkeeper.drill.scratch`).
2. Restore the newest archive to a free VMID of ``drills.guests.scratch_vmids``
   (checked against the cluster and the inventory; never ``force``), marked, with
   only the drill's tag, ``onboot=0``, ``protection=0``; every NIC detached or moved
   to the isolated ``drills.guests.bridge``; bind/device mount points and
   passthrough devices deleted (the copy must not write the original's host
   directories or grab its devices); started.
3. Up? ``status``: PVE says it runs within ``boot_timeout``; ``ssh`` / ``probe``: see
   :mod:`labkeeper.drill.reach`. (In the local lab the simulator has no guest OS:
   the lab's sshd stands in for the copy's, and a command probe can read the copy's
   root filesystem, which the simulator unpacks from the archive.)
4. RTO = restore → checked. The copy is destroyed unless the drill failed and
   keep_on_failure is set (then it is tagged ``labkeeper-drill-kept``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from labkeeper.drill.reach import check_label, reach_copy
from labkeeper.drill.result import DrillResult, objective_checks
from labkeeper.drill.scratch import (
    KEPT_TAG,
    SCRATCH_TAG,
    destroy_scratch,
    scratch_restore_options,
    sweep_scratch,
)
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.inventory import Guest, GuestDrill, Inventory

logger = logging.getLogger(__name__)

# =====================================================================================
# pure parts
# =====================================================================================


def pick_scratch_vmid(first: int, last: int, used: set[int]) -> int:
    """The lowest VMID of the scratch range used by no guest (cluster or inventory)."""
    for vmid in range(first, last + 1):
        if vmid not in used:
            return vmid
    raise ConfigError(f"no free VMID in drills.guests.scratch_vmids ({first}-{last})")


_NET_KEY = re.compile(r"net\d+")


def isolate_network(config: dict[str, Any], bridge: str | None) -> tuple[dict[str, Any],
                                                                          list[str]]:
    """``(options, delete)`` for a restored guest's config: every NIC moved to the
    isolated ``bridge`` (link kept, firewall on), or deleted when there is none."""
    options: dict[str, Any] = {}
    delete: list[str] = []
    for key, value in sorted(config.items()):
        if not _NET_KEY.fullmatch(key):
            continue
        if bridge is None:
            delete.append(key)
        else:
            parts = [p for p in str(value).split(",") if not p.startswith("bridge=")
                     and not p.startswith("tag=")]
            options[key] = ",".join([*parts, f"bridge={bridge}"])
    return options, delete


def newest_archive(volumes: Sequence[Any], vmid: int) -> Any | None:
    mine = [v for v in volumes if v.vmid == vmid]
    return max(mine, key=lambda v: (v.ctime or 0, v.volid)) if mine else None


def scratch_restore_request(px: Any, gtype: str, node: str, vmid: int, volid: str, *,
                            storage: str, options: dict[str, Any]) -> Any:
    """``POST /nodes/{node}/lxc`` (restore) or ``/qemu`` (archive) with ``options``
    (PVE ≥ 7.2 applies extra parameters of a QEMU restore over the archived config)."""
    if gtype == "lxc":
        return px.restore_lxc_request(node, vmid, volid, storage=storage, unique=True,
                                      start=False, options=options)
    base = px.restore_qemu_request(node, vmid, volid, storage=storage, unique=True,
                                   start=False)
    return px.api_request("POST", base.template, {**base.params, **options}, node=node)


# =====================================================================================
# the drill (side effects; ``px`` is labkeeper.proxmox)
# =====================================================================================


@dataclass(frozen=True)
class _Copy:
    """The scratch copy being drilled."""

    node: str
    vmid: int
    gtype: str

    @property
    def label(self) -> str:
        return f"VMID {self.vmid} on {self.node}"


def guest_drill(inv: Inventory, name: str, *, api: Any = None,
                now: Callable[[], datetime] | None = None, poll: float = 0.5,
                keep_on_failure: bool | None = None) -> DrillResult:
    """Sweep scratch copies left by dead drills, restore guest ``name``'s latest vzdump
    archive to a scratch VMID, isolated, and prove it comes up (see the module
    docstring)."""
    from labkeeper import proxmox as px

    clock = now or (lambda: datetime.now(tz=UTC))
    started = time.monotonic()
    guest = inv.guest(name)
    spec = guest.drill or GuestDrill()
    settings = inv.drills.guests
    keep = settings.keep_on_failure if keep_on_failure is None else keep_on_failure
    result = DrillResult("guest", guest.name, rpo_objective_s=spec.rpo_hours * 3600,
                         rto_objective_s=spec.rto_minutes * 60)
    try:
        api = api if api is not None else px.connect_lab(inv.proxmox)
        sweep_scratch(px, api, inv, result, now=clock(), poll=poll)
        _guest_drill(px, api, inv, guest, spec, result, keep=keep, clock=clock, poll=poll)
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    result.duration_s = time.monotonic() - started
    logger.info("guest drill %s: %s — %s", name, result.status.upper(), result.summary())
    return result


def _guest_drill(px: Any, api: Any, inv: Inventory, guest: Guest, spec: GuestDrill,
                 result: DrillResult, *, keep: bool, clock: Callable[[], datetime],
                 poll: float) -> None:
    settings = inv.drills.guests
    archive = _find_archive(px, api, inv, guest, result, clock=clock)
    if archive is None:
        return
    used = {g.vmid for g in px.list_guests(api)} | {g.vmid for g in inv.guests}
    rng = settings.scratch_vmids
    vmid = pick_scratch_vmid(rng.first, rng.last, used)
    px.next_vmid(api, vmid)  # PVE confirms it is free (400 if not)
    copy = _Copy(settings.node or guest.node, vmid, guest.type)
    storage = settings.storage or guest.resources.storage
    logger.info("%s: restoring %s to scratch VMID %s on %s (%s)", guest.name, archive.volid,
                vmid, copy.node, storage)
    restore_started = time.monotonic()
    created = False
    try:
        req = scratch_restore_request(
            px, copy.gtype, copy.node, vmid, archive.volid, storage=storage,
            options=scratch_restore_options(guest, archive.volid, clock()))
        upid = px.send(api, req)
        created = True
        task_timeout = max(settings.boot_timeout, spec.rto_minutes * 60 * 4)
        px.wait_for_task(api, upid, timeout=task_timeout, max_poll=poll)
        result.scratch = copy.label
        result.check("restore", True, f"{archive.volid} → VMID {vmid}")
        _isolate(px, api, inv, copy, result)
        _start_and_check(px, api, inv, guest, spec, copy, result, poll=poll)
        result.rto_s = time.monotonic() - restore_started
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    finally:
        if created:
            _keep_or_destroy(px, api, inv, copy, result, keep=keep, poll=poll)
    objective_checks(result)


def _find_archive(px: Any, api: Any, inv: Inventory, guest: Guest, result: DrillResult, *,
                  clock: Callable[[], datetime]) -> Any | None:
    """The guest's newest vzdump archive on its node (RPO measured), or None (failed)."""
    assert inv.proxmox is not None
    where = px.find_guest(api, guest.vmid)
    node = where.node if where is not None else guest.node
    volumes = []
    for storage in inv.proxmox.storages:
        if "backup" in storage.content:
            volumes += px.backups(api, node, storage.name, vmid=guest.vmid)
    archive = newest_archive(volumes, guest.vmid)
    if archive is None:
        result.fail(f"no vzdump archive of guest {guest.name} ({guest.vmid}) on node {node}")
        return None
    result.source = archive.volid
    if archive.ctime:
        result.rpo_s = max(0.0, clock().timestamp() - archive.ctime)
    result.check("archive", True, f"{archive.volid} ({archive.size} bytes)")
    return archive


def _isolate(px: Any, api: Any, inv: Inventory, copy: _Copy, result: DrillResult) -> None:
    """Detach the copy's NICs (or move them to the drill bridge); drop host-bound keys."""
    bridge = inv.drills.guests.bridge
    config = px.guest_config(api, copy.node, copy.vmid, copy.gtype)
    options, delete = isolate_network(config.values, bridge)
    host_bound = px.host_bound_keys(config.values)
    if options or delete or host_bound:
        px.configure(api, copy.node, copy.vmid, copy.gtype, options,
                     delete=[*delete, *host_bound])
    isolation = (f"NICs on isolated bridge {bridge}" if bridge
                 else f"{len(delete)} NIC(s) detached" if delete else "no NIC")
    result.check("network isolated", True, isolation)
    result.check("host mounts/devices removed", True,
                 ", ".join(host_bound) if host_bound else "none in the archive")


def _start_and_check(px: Any, api: Any, inv: Inventory, guest: Guest, spec: GuestDrill,
                     copy: _Copy, result: DrillResult, *, poll: float) -> None:
    """Start the copy, wait for it to run, then the ssh / probe check if asked."""
    boot_timeout = inv.drills.guests.boot_timeout
    up = px.start_guest(api, copy.node, copy.vmid, copy.gtype)
    px.wait_for_task(api, up, timeout=boot_timeout, max_poll=poll)
    deadline = time.monotonic() + boot_timeout
    status = px.guest_status(api, copy.node, copy.vmid, copy.gtype)
    while status.status != "running" and time.monotonic() < deadline:
        time.sleep(poll)
        status = px.guest_status(api, copy.node, copy.vmid, copy.gtype)
    running = result.check("running", status.status == "running",
                           f"status {status.status}" + (f", qmp {status.qmpstatus}"
                                                        if status.qmpstatus else ""))
    if spec.check == "status":
        return
    if running:
        reach_copy(inv, guest, spec, result, deadline=deadline, poll=poll)
    else:
        result.check(check_label(spec), False, "not tried: the copy is not running")


def _keep_or_destroy(px: Any, api: Any, inv: Inventory, copy: _Copy, result: DrillResult, *,
                     keep: bool, poll: float) -> None:
    """Destroy the copy, or keep it (tagged, never swept) when the drill failed and
    keep is set."""
    if not (keep and not result.passed):
        destroy_scratch(px, api, inv, copy.vmid, result, poll=poll)
        return
    result.kept = copy.label
    result.notes.append(f"scratch guest kept for inspection: {copy.label}")
    try:  # never swept: the next drills report it instead
        px.configure(api, copy.node, copy.vmid, copy.gtype, {"tags": [SCRATCH_TAG, KEPT_TAG]})
    except LabkeeperError as exc:
        result.notes.append(f"could not tag VMID {copy.vmid} {KEPT_TAG} ({exc}): the "
                            "next guest drill may destroy it once it is stale")
