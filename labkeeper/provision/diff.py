"""Read the cluster (GET requests only) and diff the inventory against it into a :class:`Plan`.

Each inventory guest becomes ``create``, ``change`` (each :class:`Change` says whether
it needs a restart), ``leave``, ``destroy`` (``state: absent``), ``absent``,
``unmanaged``, ``protected`` or ``conflict``; guests in Proxmox but not in the
inventory are listed as ``unmanaged`` and left alone. A guest without the managed
tag holding an inventory vmid is a conflict; disks grow and never shrink.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from labkeeper import proxmox as px
from labkeeper.errors import ConfigError
from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.desired import (
    LXC_RESTART_KEYS,
    QEMU_RESTART_KEYS,
    GiB,
    desired_config,
    disk_key,
    disk_size,
    flag,
    gib_text,
    normalise,
    same_value,
)
from labkeeper.provision.plan import Change, GuestPlan, Plan


@dataclass
class Actual:
    """What the cluster holds: guests by vmid, their configs, template volumes."""

    guests: dict[int, px.Guest] = field(default_factory=dict)
    configs: dict[int, dict[str, Any]] = field(default_factory=dict)
    templates: dict[tuple[str, str], list[str]] = field(default_factory=dict)


def read_actual(api: Any, inv: Inventory) -> Actual:
    """Read the cluster's state for the plan — GET requests only."""
    actual = Actual(guests={g.vmid: g for g in px.list_guests(api)})
    for guest in inv.guests:
        found = actual.guests.get(guest.vmid)
        if found is not None:
            actual.configs[guest.vmid] = px.guest_config(api, found.node, found.vmid,
                                                         found.type).values
        elif guest.state == "present" and guest.type == "lxc" and guest.template_storage:
            key = (guest.node, guest.template_storage)
            if key not in actual.templates:
                vols = px.storage_content(api, guest.node, guest.template_storage,
                                          content="vztmpl")
                actual.templates[key] = sorted(v.volid for v in vols)
    return actual


def guest_order(guests: Sequence[Guest]) -> list[Guest]:
    """Guests in dependency order (``depends_on`` first), else inventory order."""
    by_name = {g.name: g for g in guests}
    out: list[Guest] = []
    seen: set[str] = set()

    def visit(g: Guest) -> None:
        if g.name in seen:
            return
        seen.add(g.name)
        for dep in g.depends_on:
            if dep in by_name:
                visit(by_name[dep])
        out.append(g)

    for g in guests:
        visit(g)
    return out


def diff_guest(guest: Guest, inv: Inventory, actual: Actual) -> GuestPlan:
    """The plan for one inventory guest (pure)."""
    managed = inv.settings.provision.managed_tag
    base = {"name": guest.name, "vmid": guest.vmid, "type": guest.type, "node": guest.node}
    found = actual.guests.get(guest.vmid)
    if not guest.managed:
        return GuestPlan(**base, action="unmanaged", status=found.status if found else None,
                         notes=("managed: false in the inventory: labkeeper leaves it alone",))
    if found is None:
        if guest.state == "absent":
            return GuestPlan(**base, action="absent", notes=("already absent",))
        return GuestPlan(**base, action="create", status=None,
                         problems=tuple(_create_problems(guest, actual)),
                         changes=(Change("status", None, "running", kind="start"),))
    return _diff_found(guest, found, actual.configs.get(guest.vmid, {}), managed, base)


def _diff_found(guest: Guest, found: px.Guest, config: Mapping[str, Any], managed: str,
                base: dict[str, Any]) -> GuestPlan:
    """The plan for an inventory guest whose vmid Proxmox holds (pure)."""
    status = found.status
    if managed not in found.tags:
        return GuestPlan(**base, action="conflict", status=status, problems=(
            f"vmid {guest.vmid} is held by {found.type} {found.name or '?'!r} on "
            f"{found.node} without the {managed!r} tag: labkeeper does not touch it "
            f"(give the inventory guest another vmid, or tag that guest to adopt it)",))
    if found.type != guest.type or found.node != guest.node:
        return GuestPlan(**base, action="conflict", status=status, problems=(
            f"Proxmox has it as {found.type} on {found.node}, the inventory says "
            f"{guest.type} on {guest.node} (labkeeper neither migrates nor recreates)",))
    protected = normalise(config.get("protection")) == "1"
    if found.lock or config.get("lock"):
        lock = found.lock or config.get("lock")
        return GuestPlan(**base, action="conflict", status=status, problems=(
            f"locked ({lock}): a backup, snapshot or an unfinished creation holds it; "
            "rerun when the lock is gone",))
    if guest.state == "absent":
        if protected:
            return GuestPlan(**base, action="protected", status=status, problems=(
                "marked absent but protection=1: labkeeper never destroys it",))
        return GuestPlan(**base, action="destroy", status=status,
                         notes=("destroyed only with --allow-destroy",))
    return _diff_changes(guest, status, config, managed, base, protected=protected)


def _diff_changes(guest: Guest, status: str, config: Mapping[str, Any], managed: str,
                  base: dict[str, Any], *, protected: bool) -> GuestPlan:
    """The plan for a present guest of ours: its changes, held back if protected (pure)."""
    changes = config_changes(guest, managed, config, running=status == "running")
    if guest.protection and not protected:
        changes.append(Change("protection", normalise(config.get("protection")) or "0", "1",
                              kind="protect"))
    if status != "running":
        changes.append(Change("status", status, "running", kind="start"))
    if protected:
        if not guest.protection:
            changes.append(Change("protection", "1", "0"))
        held = [c for c in changes if c.kind != "start"]
        return GuestPlan(**base, action="protected" if held else "leave", status=status,
                         changes=tuple(held),
                         notes=("protection=1: labkeeper does not modify it",) if held else ())
    refused = [c for c in changes if c.kind == "refused"]
    return GuestPlan(**base, action="change" if changes else "leave", status=status,
                     changes=tuple(changes),
                     problems=tuple(f"{c.key}: {c.note}" for c in refused))


def config_changes(guest: Guest, managed_tag: str, config: Mapping[str, Any], *,
                   running: bool) -> list[Change]:
    """Option and disk changes for an existing guest (pure)."""
    gtype = guest.type
    restart_keys = QEMU_RESTART_KEYS if gtype == "qemu" else LXC_RESTART_KEYS
    changes: list[Change] = []
    want = desired_config(guest, managed_tag)
    for key, value in want.items():
        if not same_value(gtype, key, config.get(key), value):
            restart = running and (key in restart_keys or
                                   (gtype == "qemu" and key.startswith("ipconfig")))
            changes.append(Change(key, normalise(config.get(key)), value, needs_restart=restart))
    for key in sorted(config):
        if key.startswith("net") and key[3:].isdigit() and key not in want:
            changes.append(Change(key, normalise(config[key]), None, kind="delete"))
    if gtype == "lxc" and normalise(config.get("unprivileged")) != flag(guest.unprivileged) \
            and not (config.get("unprivileged") is None and not guest.unprivileged):
        changes.append(Change("unprivileged", normalise(config.get("unprivileged")) or "0",
                              flag(guest.unprivileged), kind="refused",
                              note="cannot change after creation (recreate the guest)"))
    dkey = disk_key(gtype, config)
    if dkey is not None:
        storage, size = disk_size(config[dkey])
        wanted = guest.resources.disk_gb * GiB
        if storage != guest.resources.storage:
            changes.append(Change(f"{dkey} storage", storage, guest.resources.storage,
                                  kind="refused", note="moving disks is not supported"))
        if size < wanted:
            changes.append(Change(dkey, gib_text(size), gib_text(wanted), kind="grow"))
        elif size > wanted:
            changes.append(Change(dkey, gib_text(size), gib_text(wanted), kind="refused",
                                  note="disks never shrink"))
    return changes


def _create_problems(guest: Guest, actual: Actual) -> list[str]:
    if guest.type == "lxc":
        storage = guest.template_storage or "?"
        have = actual.templates.get((guest.node, storage), [])
        if guest.template not in have:
            return [f"template {guest.template} not found in storage {storage!r} on "
                    f"{guest.node}; templates there: {', '.join(have) or 'none'}"]
        return []
    tvmid = guest.template_vmid
    tmpl = actual.guests.get(tvmid or -1)
    if tmpl is None or tmpl.type != "qemu" or not tmpl.template:
        templates = sorted(f"{g.vmid} ({g.name})" for g in actual.guests.values()
                           if g.type == "qemu" and g.template)
        what = "does not exist" if tmpl is None else "is not a QEMU template"
        return [f"template vmid {tvmid} {what}; QEMU templates: {', '.join(templates) or 'none'}"]
    return []


def make_plan(inv: Inventory, actual: Actual) -> Plan:
    """Diff the inventory against ``actual`` (pure)."""
    out = [diff_guest(g, inv, actual) for g in guest_order(inv.guests)]
    known = {g.vmid for g in inv.guests}
    managed = inv.settings.provision.managed_tag
    for vmid in sorted(actual.guests):
        if vmid in known:
            continue
        g = actual.guests[vmid]
        note = "template" if g.template else (
            f"has the {managed!r} tag but is not in the inventory" if managed in g.tags
            else f"no {managed!r} tag")
        out.append(GuestPlan(name=g.name or f"vm{vmid}", vmid=vmid, type=g.type, node=g.node,
                             action="unmanaged", status=g.status, in_inventory=False,
                             notes=(f"not in the inventory, left alone ({note})",)))
    return Plan(inv.lab.name, tuple(out), inv.settings.provision.max_changes_without_yes)


def read_plan(api: Any, inv: Inventory) -> Plan:
    """Read the cluster and diff: the whole plan, with GET requests only."""
    if inv.proxmox is None:
        raise ConfigError("the inventory has no proxmox section: nothing to provision")
    return make_plan(inv, read_actual(api, inv))
