"""Provisioning: make Proxmox match the inventory's guests — plan first, then apply.

No Prefect here (``flows/provision.py`` runs these steps as tasks). The shape:

* :func:`read_actual` reads the cluster with GET requests only (``/cluster/resources``,
  each inventory guest's config, the template storages' content);
* :func:`make_plan` (pure) diffs the inventory against it into a :class:`Plan`: one
  :class:`GuestPlan` per guest — ``create``, ``change`` (each :class:`Change` says
  whether it needs a restart), ``leave``, ``destroy`` (``state: absent``),
  ``unmanaged`` (in Proxmox, not labkeeper's), ``protected``, ``conflict`` — with a
  readable table (:meth:`Plan.table`, :meth:`Plan.markdown`) and JSON (:meth:`Plan.to_json`);
* steps (:func:`create_guest`, :func:`converge_guest`, :func:`start_guest`,
  :func:`wait_for_ssh`, :func:`protect_guest`, :func:`destroy_guest`,
  :func:`cleanup_guest`) each re-read the state they act on and change only what
  differs (check, then change), so a rerun after a crash at any point converges;
* :func:`apply_plan` runs the steps of every guest through a pluggable runner (the
  flow passes one that calls Prefect tasks), cleans up guests whose creation failed
  half-way (``cleanup_on_failure``) and enforces the guardrails.

Guardrails: a guest without the managed tag is never modified (an inventory guest
whose vmid is held by one is a conflict); a guest with ``protection=1`` is never
modified; a plan touching more than ``max_changes_without_yes`` guests needs
``yes``; restarts need ``allow_restart``, destroys ``allow_destroy``; disks grow and
never shrink. The inventory's vmid is authoritative: creation checks it is free
(``/cluster/nextid?vmid=``) and PVE refuses a vmid that exists, so two creations
racing for one vmid cannot both succeed.

Known gap: the PVE structure file this project validates against lost every
parameter named ``description``; until it is restored, descriptions are not sent
(:data:`SEND_DESCRIPTION`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal
from urllib.parse import quote, unquote

from labkeeper import proxmox as px
from labkeeper.errors import (
    ConfigError,
    HostKeyError,
    PermanentError,
    ServiceError,
    SSHError,
)
from labkeeper.inventory import Guest, Inventory, Nic
from labkeeper.secrets import redact, resolve

SEND_DESCRIPTION = True
"""Send the inventory's ``description`` to PVE."""

Action = Literal["create", "change", "leave", "destroy", "absent", "unmanaged", "protected",
                 "conflict"]
StepStatus = Literal["changed", "unchanged", "ok", "held", "skipped", "failed", "cleanup"]

QEMU_RESTART_KEYS = frozenset({"cores", "sockets", "memory", "balloon", "ciuser", "sshkeys",
                               "nameserver", "searchdomain", "ciupgrade", "cipassword"})
"""QEMU options that take effect only after a restart (CPU/memory hotplug is off by
default; cloud-init is read at boot)."""
LXC_RESTART_KEYS = frozenset({"features"})
QEMU_DISKS = ("scsi0", "virtio0", "sata0", "ide0")
NET_KEYS_LXC = ("name", "bridge", "ip", "gw", "ip6", "gw6", "tag", "firewall", "mtu")
NET_KEYS_QEMU = ("bridge", "tag", "firewall", "mtu")
QEMU_MODELS = ("virtio", "e1000", "vmxnet3", "rtl8139")
GiB = 1024**3
PVE_DEFAULTS = {"onboot": "0", "ciupgrade": "1", "firewall": "0"}
"""What PVE assumes for an option that is not in a guest's config."""
PVE_TYPE_DEFAULTS = {"lxc": {"memory": "512", "swap": "512"},
                     "qemu": {"cores": "1", "sockets": "1"}}
"""The same, per guest type (the API schema's defaults; an LXC without ``cores``
has no CPU limit, so it has no default here)."""


class ProvisionError(PermanentError):
    """Provisioning cannot go on for a guest (a missing template, a conflict...)."""


class VmidTaken(ProvisionError):
    """The inventory's vmid is held by another guest (never cleaned up by us)."""


class GuestUnreachable(PermanentError):
    """The guest did not answer SSH in time (or offered the wrong host key)."""


class TooManyChanges(ConfigError):
    """The plan touches more guests than ``max_changes_without_yes``."""


# ====================================================================== pure: desired config


def parse_props(text: str | None) -> dict[str, str]:
    """PVE's property strings: ``name=eth0,bridge=vmbr0`` → dict (bare items map to '')."""
    out: dict[str, str] = {}
    for part in str(text or "").split(","):
        if not part:
            continue
        key, sep, value = part.partition("=")
        out[key.strip()] = value.strip() if sep else ""
    return out


def format_props(props: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" if v != "" else k for k, v in props.items())


def _bool(value: bool) -> str:
    return "1" if value else "0"


def lxc_net(nic: Nic) -> dict[str, str]:
    props = {"name": nic.name, "bridge": nic.bridge}
    if nic.mac:
        props["hwaddr"] = nic.mac
    for key, value in (("ip", nic.ip), ("gw", nic.gateway), ("ip6", nic.ip6),
                       ("gw6", nic.gateway6)):
        if value is not None:
            props[key] = str(value)
    if nic.vlan is not None:
        props["tag"] = str(nic.vlan)
    if nic.firewall:
        props["firewall"] = "1"
    if nic.mtu is not None:
        props["mtu"] = str(nic.mtu)
    return props


def qemu_net(nic: Nic) -> dict[str, str]:
    props = {nic.model: nic.mac or "", "bridge": nic.bridge}
    if nic.vlan is not None:
        props["tag"] = str(nic.vlan)
    if nic.firewall:
        props["firewall"] = "1"
    if nic.mtu is not None:
        props["mtu"] = str(nic.mtu)
    return props


def ipconfig_of(nic: Nic) -> str | None:
    parts = []
    if nic.ip not in (None, "manual"):
        parts.append(f"ip={nic.ip}")
    if nic.gateway:
        parts.append(f"gw={nic.gateway}")
    if nic.ip6 not in (None, "manual"):
        parts.append(f"ip6={nic.ip6}")
    if nic.gateway6:
        parts.append(f"gw6={nic.gateway6}")
    return ",".join(parts) or None


def desired_tags(guest: Guest, managed_tag: str) -> str:
    return ";".join(sorted({*guest.tags, managed_tag}))


def desired_config(guest: Guest, managed_tag: str, *,
                   with_description: bool = SEND_DESCRIPTION) -> dict[str, str]:
    """The PVE options labkeeper manages for ``guest`` (without disk and protection)."""
    r = guest.resources
    cfg: dict[str, str] = {"cores": str(r.cores), "memory": str(r.memory_mb),
                           "onboot": _bool(guest.onboot),
                           "tags": desired_tags(guest, managed_tag)}
    if guest.startup_order is not None:
        cfg["startup"] = f"order={guest.startup_order}"
    if with_description and guest.description:
        cfg["description"] = guest.description
    if guest.type == "lxc":
        cfg["hostname"] = guest.name
        cfg["swap"] = str(r.swap_mb)
        for i, nic in enumerate(guest.network):
            cfg[f"net{i}"] = format_props(lxc_net(nic))
        if guest.features is not None:
            f = guest.features
            feats = {"nesting": _bool(f.nesting), "keyctl": _bool(f.keyctl),
                     "fuse": _bool(f.fuse)}
            feats = {k: v for k, v in feats.items() if v == "1"}
            if f.mount:
                feats["mount"] = ";".join(f.mount)
            if feats:
                cfg["features"] = format_props(feats)
    else:
        cfg["name"] = guest.name
        cfg["sockets"] = str(r.sockets)
        if r.balloon_mb is not None:
            cfg["balloon"] = str(r.balloon_mb)
        for i, nic in enumerate(guest.network):
            cfg[f"net{i}"] = format_props(qemu_net(nic))
        ci = guest.cloud_init
        if ci is not None:
            if ci.user:
                cfg["ciuser"] = ci.user
            if ci.ssh_keys:
                cfg["sshkeys"] = quote("\n".join(ci.ssh_keys), safe="")
            if ci.nameservers:
                cfg["nameserver"] = " ".join(ci.nameservers)
            if ci.searchdomain:
                cfg["searchdomain"] = ci.searchdomain
            cfg["ciupgrade"] = _bool(ci.upgrade)
            ipconfigs = ci.ipconfig if ci.ipconfig is not None else [
                ipconfig_of(n) for n in guest.network]
            for i, value in enumerate(ipconfigs):
                if value:
                    cfg[f"ipconfig{i}"] = value
    return cfg


def _norm(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return _bool(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _tags_set(value: Any) -> frozenset[str]:
    return frozenset(t for t in str(value or "").replace(",", ";").replace(" ", ";").split(";")
                     if t)


def _net_view(gtype: str, props: Mapping[str, str], want_mac: bool) -> dict[str, str]:
    """The parts of a NIC labkeeper manages, normalised for comparison."""
    if gtype == "lxc":
        view = {k: props.get(k, "") for k in NET_KEYS_LXC}
        if want_mac:
            view["hwaddr"] = props.get("hwaddr", "").upper()
    else:
        model = next((m for m in QEMU_MODELS if m in props), props.get("model", ""))
        view = {"model": model, **{k: props.get(k, "") for k in NET_KEYS_QEMU}}
        if want_mac:
            view["mac"] = (props.get(model) or props.get("macaddr", "")).upper()
    if view.get("firewall") == "0":
        view["firewall"] = ""
    return view


def same_value(gtype: str, key: str, actual: Any, desired: str | None) -> bool:
    """Whether PVE's ``actual`` value already is what labkeeper wants."""
    a = _norm(actual)
    if desired is None:
        return a is None
    if a is None:
        return desired in (PVE_DEFAULTS.get(key), PVE_TYPE_DEFAULTS.get(gtype, {}).get(key))
    if key == "tags":
        return _tags_set(a) == _tags_set(desired)
    if key.startswith("net") and key[3:].isdigit():
        want = parse_props(desired)
        want_mac = "hwaddr" in want or any(want.get(m) for m in QEMU_MODELS)
        return _net_view(gtype, parse_props(a), want_mac) == _net_view(gtype, want, want_mac)
    if key == "features":
        return parse_props(a) == parse_props(desired)
    if key == "sshkeys":
        return unquote(a).strip() == unquote(desired).strip()
    if key in ("cores", "memory", "swap", "sockets", "balloon", "onboot", "ciupgrade"):
        try:
            return int(float(a)) == int(desired)
        except ValueError:
            return a == desired
    return a == desired


def merged_net(gtype: str, actual: Any, desired: str) -> str:
    """The NIC value to send: the desired one, keeping PVE's MAC when none is wanted."""
    want = parse_props(desired)
    have = parse_props(_norm(actual))
    if gtype == "lxc":
        if "hwaddr" not in want and have.get("hwaddr"):
            want["hwaddr"] = have["hwaddr"]
        return format_props(want)
    model = next(m for m in QEMU_MODELS if m in want)
    if not want[model]:
        mac = next((have[m] for m in QEMU_MODELS if have.get(m)), have.get("macaddr", ""))
        if mac:
            want[model] = mac
    return format_props(want)


def disk_key(gtype: str, config: Mapping[str, Any]) -> str | None:
    if gtype == "lxc":
        return "rootfs" if "rootfs" in config else None
    for key in QEMU_DISKS:
        value = str(config.get(key, ""))
        if value and "media=cdrom" not in value:
            return key
    return None


def size_bytes(text: str) -> int:
    text = text.strip()
    unit = text[-1:].upper()
    mult = {"K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}
    if unit in mult:
        return int(float(text[:-1]) * mult[unit])
    return int(float(text) * GiB) if text else 0  # PVE: a bare number means GiB


def disk_size(value: Any) -> tuple[str, int]:
    """(storage, bytes) of a disk option like ``local-lvm:vm-100-disk-0,size=8G``."""
    props = parse_props(_norm(value))
    first = next(iter(props), "")
    volid = props.get("volume") or first
    storage = volid.split(":", 1)[0]
    return storage, size_bytes(props["size"]) if props.get("size") else 0


def _gib(n: int) -> str:
    return f"{n / GiB:g}G"


# ====================================================================== plan


@dataclass(frozen=True)
class Change:
    """One difference between Proxmox and the inventory."""

    key: str
    old: str | None
    new: str | None
    kind: Literal["set", "delete", "grow", "start", "protect", "refused"] = "set"
    needs_restart: bool = False
    note: str = ""

    def text(self) -> str:
        if self.kind == "start":
            return "start (stopped → running)"
        old = _short(self.key, self.old)
        new = _short(self.key, self.new)
        text = f"{self.key}: {old} → {new}"
        if self.kind == "grow":
            text += " (grow)"
        if self.kind == "refused":
            text += f" REFUSED: {self.note}"
        elif self.needs_restart:
            text += " [restart]"
        return text


def _short(key: str, value: str | None) -> str:
    if value is None:
        return "∅"
    if key == "sshkeys":
        return f"{len(unquote(value).splitlines())} key(s)"
    return value if len(value) <= 60 else value[:57] + "..."


@dataclass(frozen=True)
class GuestPlan:
    name: str
    vmid: int
    type: str
    node: str
    action: Action
    changes: tuple[Change, ...] = ()
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    status: str | None = None
    in_inventory: bool = True

    @property
    def needs_restart(self) -> bool:
        return any(c.needs_restart for c in self.changes)

    @property
    def touches(self) -> bool:
        return self.action in ("create", "change", "destroy")

    def summary(self) -> str:
        parts = [c.text() for c in self.changes]
        parts += [f"PROBLEM: {p}" for p in self.problems]
        parts += list(self.notes)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["needs_restart"] = self.needs_restart
        d["changes"] = [asdict(c) for c in self.changes]
        d["problems"] = list(self.problems)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class Plan:
    lab: str
    guests: tuple[GuestPlan, ...]
    max_changes_without_yes: int = 5

    @property
    def touched(self) -> list[GuestPlan]:
        return [g for g in self.guests if g.touches]

    @property
    def problems(self) -> list[str]:
        return [f"{g.name} ({g.vmid}): {p}" for g in self.guests for p in g.problems]

    @property
    def is_empty(self) -> bool:
        """Nothing to create, change or destroy, and nothing wrong."""
        return not self.touched and not self.problems

    @property
    def needs_yes(self) -> bool:
        return len(self.touched) > self.max_changes_without_yes

    def guest(self, name: str) -> GuestPlan:
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.guests:
            out[g.action] = out.get(g.action, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"lab": self.lab, "counts": self.counts(), "touched": len(self.touched),
                "needs_yes": self.needs_yes, "needs_restart": [
                    g.name for g in self.guests if g.needs_restart],
                "problems": self.problems, "guests": [g.to_dict() for g in self.guests]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def rows(self) -> list[dict[str, Any]]:
        return [{"guest": g.name, "vmid": g.vmid, "type": g.type, "node": g.node,
                 "action": g.action, "restart": "yes" if g.needs_restart else "",
                 "details": g.summary()} for g in self.guests]

    def headline(self) -> str:
        c = self.counts()
        parts = [f"{c[a]} {a}" for a in ("create", "change", "destroy", "leave", "absent",
                                          "unmanaged", "protected", "conflict") if c.get(a)]
        text = f"plan for lab {self.lab}: " + (", ".join(parts) or "no guests")
        if self.is_empty:
            text += " — nothing to do"
        return text

    def table(self) -> str:
        """A plain-text table (the CLI prints a rich table from :meth:`rows`)."""
        rows = self.rows()
        cols = ("guest", "vmid", "type", "node", "action", "restart", "details")
        widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in cols[:-1]}
        lines = [self.headline(), "  ".join(c.ljust(widths.get(c, 0)) for c in cols)]
        for r in rows:
            lines.append("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in cols).rstrip())
        for p in self.problems:
            lines.append(f"problem: {p}")
        return "\n".join(lines)

    def markdown(self) -> str:
        icon = {"create": "🆕", "change": "✏️", "destroy": "🗑️", "leave": "·", "absent": "·",
                "unmanaged": "👤", "protected": "🔒", "conflict": "❌"}
        lines = [f"# Provisioning plan — {self.lab}", "", self.headline(), "",
                 "| | guest | vmid | type | node | action | restart | details |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows():
            details = str(r["details"]).replace("|", "\\|")
            lines.append(f"| {icon.get(r['action'], '')} | {r['guest']} | {r['vmid']} | "
                         f"{r['type']} | {r['node']} | {r['action']} | {r['restart']} | "
                         f"{details} |")
        if self.problems:
            lines += ["", "## Problems", *(f"- {p}" for p in self.problems)]
        if self.needs_yes:
            lines += ["", f"**The plan touches {len(self.touched)} guests (more than "
                          f"{self.max_changes_without_yes}): apply needs `--yes`.**"]
        return "\n".join(lines)


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
    config = actual.configs.get(guest.vmid, {})
    protected = _norm(config.get("protection")) == "1"
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
    changes = config_changes(guest, managed, config, running=status == "running")
    if guest.protection and not protected:
        changes.append(Change("protection", _norm(config.get("protection")) or "0", "1",
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
            changes.append(Change(key, _norm(config.get(key)), value, needs_restart=restart))
    for key in sorted(config):
        if key.startswith("net") and key[3:].isdigit() and key not in want:
            changes.append(Change(key, _norm(config[key]), None, kind="delete"))
    if gtype == "lxc" and _norm(config.get("unprivileged")) != _bool(guest.unprivileged) \
            and not (config.get("unprivileged") is None and not guest.unprivileged):
        changes.append(Change("unprivileged", _norm(config.get("unprivileged")) or "0",
                              _bool(guest.unprivileged), kind="refused",
                              note="cannot change after creation (recreate the guest)"))
    dkey = disk_key(gtype, config)
    if dkey is not None:
        storage, size = disk_size(config[dkey])
        wanted = guest.resources.disk_gb * GiB
        if storage != guest.resources.storage:
            changes.append(Change(f"{dkey} storage", storage, guest.resources.storage,
                                  kind="refused", note="moving disks is not supported"))
        if size < wanted:
            changes.append(Change(dkey, _gib(size), _gib(wanted), kind="grow"))
        elif size > wanted:
            changes.append(Change(dkey, _gib(size), _gib(wanted), kind="refused",
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


# ====================================================================== steps


@dataclass(frozen=True)
class StepResult:
    guest: str
    step: str
    status: StepStatus
    detail: str = ""
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"guest": self.guest, "step": self.step, "status": self.status,
                "seconds": round(self.seconds, 2), "detail": redact(self.detail)}


Log = Callable[[str], None]


def _nolog(_: str) -> None:
    return None


def _wait(api: Any, upid: px.Upid, inv: Inventory, timeout: float | None = None
          ) -> px.TaskResult:
    assert inv.proxmox is not None
    return px.wait_for_task(api, upid, timeout=timeout or inv.proxmox.task_timeout,
                            poll=0.05, max_poll=2.0)


def _find(api: Any, guest: Guest) -> px.Guest | None:
    return px.find_guest(api, guest.vmid)


def _is_ours(found: px.Guest, guest: Guest, managed_tag: str) -> bool:
    return managed_tag in found.tags and found.type == guest.type and found.node == guest.node


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


def create_guest(api: Any, inv: Inventory, guest: Guest, *, log: Log = _nolog) -> StepResult:
    """Create the guest (LXC from its template, QEMU as a clone), unless it exists.

    Check, then change: a guest of ours with this vmid already there is
    ``unchanged`` (a rerun after a crash); one that is not ours raises
    :class:`VmidTaken`. The vmid is checked free first (``/cluster/nextid``);
    PVE itself refuses to create an existing vmid, so a race has one winner.
    """
    started = time.monotonic()
    managed = inv.settings.provision.managed_tag
    found = _find(api, guest)
    if found is not None:
        if _is_ours(found, guest, managed):
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
        _check_template(api, guest)
        req = create_request(inv, guest)
        log(f"{guest.name}: creating LXC {guest.vmid} on {guest.node} from {guest.template}")
        upid = _start_creation(api, guest, req)
        _wait(api, upid, inv)
        detail = f"created LXC {guest.vmid} from {guest.template}"
    else:
        tvmid = guest.template_vmid or 0
        tmpl = px.find_guest(api, tvmid)
        if tmpl is None or not tmpl.template:
            raise ProvisionError(f"{guest.name}: template vmid {tvmid} is not a QEMU template")
        req = px.clone_qemu_request(
            tmpl.node, tvmid, guest.vmid, name=guest.name, full=guest.full_clone,
            target=guest.node if guest.node != tmpl.node else None,
            storage=guest.resources.storage if guest.full_clone else None, pool=guest.pool)
        log(f"{guest.name}: cloning QEMU template {tvmid} into {guest.vmid} on {guest.node}")
        upid = _start_creation(api, guest, req)
        _wait(api, upid, inv)
        # tag it at once: from here on it is recognisably ours (crash-safety)
        px.configure(api, guest.node, guest.vmid, "qemu",
                     {"tags": desired_tags(guest, managed)})
        if guest.cloud_init and guest.cloud_init.password:
            px.configure(api, guest.node, guest.vmid, "qemu", {
                "cipassword": resolve(guest.cloud_init.password).get_secret_value()})
        detail = f"cloned QEMU template {tvmid} ({'full' if guest.full_clone else 'linked'})"
    return StepResult(guest.name, "create", "changed", detail, time.monotonic() - started)


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


def _read(api: Any, guest: Guest) -> tuple[px.Guest | None, dict[str, Any]]:
    found = _find(api, guest)
    if found is None:
        return None, {}
    return found, px.guest_config(api, found.node, found.vmid, found.type).values


def _check_ours(found: px.Guest | None, guest: Guest, managed: str, step: str) -> px.Guest:
    if found is None:
        raise ProvisionError(f"{guest.name}: {step}: guest {guest.vmid} does not exist")
    if not _is_ours(found, guest, managed):
        raise VmidTaken(f"{guest.name}: {step}: {found.type} {guest.vmid} on {found.node} "
                        f"is not labkeeper's (no {managed!r} tag); not touched")
    return found


def converge_guest(api: Any, inv: Inventory, guest: Guest, *, allow_restart: bool = False,
                   log: Log = _nolog) -> StepResult:
    """Apply option changes and disk growth; restart only with ``allow_restart``.

    Re-reads the guest first (the plan may be stale). Protected guests and
    refused changes (shrink, storage move) are never applied.
    """
    started = time.monotonic()
    managed = inv.settings.provision.managed_tag
    found, config = _read(api, guest)
    found = _check_ours(found, guest, managed, "configure")
    if _norm(config.get("protection")) == "1":
        return StepResult(guest.name, "configure", "skipped",
                          "protection=1: labkeeper does not modify it")
    running = found.status == "running"
    changes = config_changes(guest, managed, config, running=running)
    options = {c.key: merged_net(guest.type, config.get(c.key), c.new)
               if c.key.startswith("net") and c.new else c.new
               for c in changes if c.kind == "set" and (allow_restart or not c.needs_restart)}
    deletes = [c.key for c in changes if c.kind == "delete"]
    held = [c.key for c in changes if c.kind == "set" and c.needs_restart and not allow_restart]
    grows = [c for c in changes if c.kind == "grow"]
    refused = [c for c in changes if c.kind == "refused"]
    done: list[str] = []
    if options or deletes:
        px.configure(api, guest.node, guest.vmid, guest.type, options, delete=deletes,
                     digest=str(config.get("digest") or "") or None)
        done += [f"{k}={_short(k, v)}" for k, v in options.items()] + [
            f"-{k}" for k in deletes]
    for c in grows:
        assert c.new is not None
        log(f"{guest.name}: growing {c.key} {c.old} → {c.new}")
        _wait(api, px.resize_disk(api, guest.node, guest.vmid, guest.type, c.key, c.new), inv)
        done.append(f"{c.key} {c.old}→{c.new}")
    restarted = False
    if running and allow_restart and any(c.needs_restart for c in changes if c.key in options):
        log(f"{guest.name}: restarting to apply {', '.join(k for k in options)}")
        _wait(api, px.shutdown_guest(api, guest.node, guest.vmid, guest.type, timeout=120,
                                     force_stop=True), inv)
        _wait(api, px.start_guest(api, guest.node, guest.vmid, guest.type), inv)
        restarted = True
    parts = []
    if done:
        parts.append("set " + ", ".join(done))
    if restarted:
        parts.append("restarted")
    if held:
        parts.append(f"held (needs --allow-restart): {', '.join(held)}")
    if refused:
        parts.append("refused: " + "; ".join(f"{c.key} {c.note}" for c in refused))
    status: StepStatus = "changed" if done else ("held" if held else "unchanged")
    if refused:
        raise ProvisionError(f"{guest.name}: " + "; ".join(parts))
    return StepResult(guest.name, "configure", status, "; ".join(parts) or "as declared",
                      time.monotonic() - started)


def start_guest(api: Any, inv: Inventory, guest: Guest, *, log: Log = _nolog) -> StepResult:
    started = time.monotonic()
    managed = inv.settings.provision.managed_tag
    found = _check_ours(_find(api, guest), guest, managed, "start")
    if found.status == "running":
        return StepResult(guest.name, "start", "unchanged", "running")
    log(f"{guest.name}: starting {guest.type} {guest.vmid}")
    _wait(api, px.start_guest(api, guest.node, guest.vmid, guest.type), inv)
    return StepResult(guest.name, "start", "changed", "started", time.monotonic() - started)


def protect_guest(api: Any, inv: Inventory, guest: Guest, *, log: Log = _nolog) -> StepResult:
    """Set ``protection=1`` last (a protected guest could not be cleaned up)."""
    if not guest.protection:
        return StepResult(guest.name, "protect", "skipped", "not asked for")
    found, config = _read(api, guest)
    _check_ours(found, guest, inv.settings.provision.managed_tag, "protect")
    if _norm(config.get("protection")) == "1":
        return StepResult(guest.name, "protect", "unchanged", "protection=1")
    px.configure(api, guest.node, guest.vmid, guest.type, {"protection": 1})
    return StepResult(guest.name, "protect", "changed", "protection=1")


def _stop_and_destroy(api: Any, inv: Inventory, found: px.Guest) -> None:
    if found.status == "running":
        _wait(api, px.stop_guest(api, found.node, found.vmid, found.type), inv)
    _wait(api, px.destroy_guest(api, found.node, found.vmid, found.type), inv)


def destroy_guest(api: Any, inv: Inventory, guest: Guest, *, log: Log = _nolog) -> StepResult:
    """Destroy an ``absent`` guest of ours (stop first); gone already is ``unchanged``."""
    started = time.monotonic()
    found, config = _read(api, guest)
    if found is None:
        return StepResult(guest.name, "destroy", "unchanged", "already absent")
    _check_ours(found, guest, inv.settings.provision.managed_tag, "destroy")
    if _norm(config.get("protection")) == "1":
        raise ProvisionError(f"{guest.name}: protection=1: labkeeper never destroys it")
    log(f"{guest.name}: destroying {found.type} {found.vmid} on {found.node}")
    _stop_and_destroy(api, inv, found)
    return StepResult(guest.name, "destroy", "changed", f"destroyed {found.type} {found.vmid}",
                      time.monotonic() - started)


def cleanup_policy(inv: Inventory, guest: Guest) -> Literal["destroy", "report"]:
    return guest.cleanup_on_failure or inv.settings.provision.cleanup_on_failure


def cleanup_guest(api: Any, inv: Inventory, guest: Guest, reason: str, *,
                  log: Log = _nolog) -> StepResult:
    """After a failed creation: destroy the half-made guest, or report it, per inventory.

    Only ever called for a guest this run set out to create; still, only a guest
    with the managed tag, the inventory's name, type and node is destroyed.
    """
    policy = cleanup_policy(inv, guest)
    found = _find(api, guest)
    if found is None:
        return StepResult(guest.name, "cleanup", "cleanup",
                          f"nothing left behind (Proxmox removed it): {reason}")
    managed = inv.settings.provision.managed_tag
    ours = _is_ours(found, guest, managed) and (found.name in ("", guest.name))
    if policy == "report" or not ours:
        why = "cleanup_on_failure: report" if ours else "it does not look like ours"
        return StepResult(guest.name, "cleanup", "failed",
                          f"LEFT FOR CLEANUP: {found.type} {found.vmid} on {found.node} "
                          f"({found.status}) — {why}; creation failed: {reason}")
    log(f"{guest.name}: creation failed ({reason}); destroying the half-made guest")
    _stop_and_destroy(api, inv, found)
    return StepResult(guest.name, "cleanup", "cleanup",
                      f"destroyed half-made {found.type} {found.vmid}: {reason}")


def wait_for_ssh(inv: Inventory, guest: Guest, *, timeout: float | None = None,
                 interval: float = 1.0, log: Log = _nolog,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> StepResult:
    """Wait until the guest answers SSH with the expected host key (pinned, in
    known_hosts, or recorded on first contact when the inventory allows TOFU).

    A wrong host key fails at once; refused/unreachable/auth-not-yet is retried
    until ``timeout`` (default ``settings.provision.ssh_wait_timeout``).
    """
    from labkeeper import ssh

    spec = inv.ssh_targets().get(guest.name)
    if spec is None:
        return StepResult(guest.name, "wait-ssh", "skipped", "no ssh section")
    target = ssh.SshTarget.from_spec(spec)
    limit = timeout if timeout is not None else inv.settings.provision.ssh_wait_timeout
    started = clock()
    last: Exception | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            with ssh.connect(target) as client:
                client.run(("true",), timeout=30)
            return StepResult(guest.name, "wait-ssh", "ok",
                              f"{target.user}@{target.host}:{target.port} answered "
                              f"(attempt {attempts})", clock() - started)
        except HostKeyError as exc:
            raise GuestUnreachable(f"{guest.name}: {exc}") from None
        except SSHError as exc:
            last = exc
        remaining = started + limit - clock()
        if remaining <= 0:
            raise GuestUnreachable(
                f"{guest.name}: SSH on {target.host}:{target.port} did not answer within "
                f"{limit:g}s ({attempts} attempts; last error: {last})")
        sleep(min(interval, remaining))


# ====================================================================== apply


@dataclass(frozen=True)
class ApplyOptions:
    allow_restart: bool = False
    allow_destroy: bool = False
    yes: bool = False
    bootstrap: bool = True


def steps_for(gp: GuestPlan, guest: Guest | None, opts: ApplyOptions) -> list[str]:
    """Which steps a guest's plan entry runs, in order (pure)."""
    if guest is None or gp.action in ("unmanaged", "conflict", "absent", "protected"):
        return []
    if gp.action == "destroy":
        return ["destroy"] if opts.allow_destroy else []
    if gp.action == "create" and gp.problems:
        return []
    steps = ["create", "configure"] if gp.action == "create" else (
        ["configure"] if gp.action == "change" and any(
            c.kind not in ("start", "protect") for c in gp.changes) else [])
    steps.append("start")
    if guest.ssh is not None:
        steps.append("wait-ssh")
        if opts.bootstrap and guest.roles:
            steps.append("bootstrap")
    if guest.protection:
        steps.append("protect")
    return steps


StepRunner = Callable[[str, Guest, str], StepResult]
"""``run(step, guest, reason)``: run one step (``reason`` is for ``cleanup``); raises on failure."""


@dataclass
class ApplyReport:
    plan: Plan
    results: list[StepResult] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left_for_cleanup: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.plan.problems

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, "left_for_cleanup": self.left_for_cleanup,
                "problems": self.plan.problems, "steps": self.rows(),
                "plan": self.plan.to_dict()}

    def summary(self) -> str:
        changed = sum(r.status == "changed" for r in self.results)
        text = (f"provision {self.plan.lab}: {changed} step(s) changed something, "
                f"{len(self.failed)} guest(s) failed")
        if self.left_for_cleanup:
            text += f", left for cleanup: {', '.join(self.left_for_cleanup)}"
        if self.plan.problems:
            text += f"; {len(self.plan.problems)} plan problem(s)"
        return text


def check_guardrails(plan: Plan, opts: ApplyOptions) -> None:
    if plan.needs_yes and not opts.yes:
        names = ", ".join(f"{g.name} ({g.action})" for g in plan.touched)
        raise TooManyChanges(
            f"the plan touches {len(plan.touched)} guests, more than "
            f"settings.provision.max_changes_without_yes={plan.max_changes_without_yes}: "
            f"{names}; review the plan and rerun with --yes", problems=[names])


def apply_plan(plan: Plan, inv: Inventory, opts: ApplyOptions, run: StepRunner, *,
               log: Log = _nolog) -> ApplyReport:
    """Run every guest's steps in dependency order; clean up failed creations.

    A failing guest does not stop the others (guests depending on it are
    skipped); the report lists every failure and every guest left for cleanup.
    """
    check_guardrails(plan, opts)
    report = ApplyReport(plan)
    by_name = {g.name: g for g in inv.guests}
    failed: set[str] = set()
    for gp in plan.guests:
        guest = by_name.get(gp.name) if gp.in_inventory else None
        if guest is None:
            continue
        if gp.action == "destroy" and not opts.allow_destroy:
            report.results.append(StepResult(gp.name, "destroy", "held",
                                             "marked absent: rerun with --allow-destroy"))
            continue
        if gp.problems and gp.action in ("create", "conflict", "protected"):
            report.results.append(StepResult(gp.name, "plan", "failed", "; ".join(gp.problems)))
            failed.add(gp.name)
            continue
        blocked = [d for d in guest.depends_on if d in failed]
        if blocked:
            report.results.append(StepResult(gp.name, "plan", "skipped",
                                             f"depends on failed {', '.join(blocked)}"))
            failed.add(gp.name)
            continue
        creating = False
        for step in steps_for(gp, guest, opts):
            if step == "create":
                creating = True
            try:
                report.results.append(run(step, guest, ""))
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}"
                report.results.append(StepResult(gp.name, step, "failed", redact(detail)))
                failed.add(gp.name)
                log(f"{gp.name}: {step} failed: {redact(detail)}")
                if creating and not isinstance(exc, VmidTaken):
                    _cleanup(report, run, guest, f"{step} failed: {exc}")
                break
    report.failed = sorted(failed)
    return report


def _cleanup(report: ApplyReport, run: StepRunner, guest: Guest, reason: str) -> None:
    try:
        res = run("cleanup", guest, redact(reason))
    except Exception as exc:
        res = StepResult(guest.name, "cleanup", "failed",
                         f"LEFT FOR CLEANUP: cleanup failed: {type(exc).__name__}: {exc}")
    report.results.append(res)
    if res.status == "failed":
        report.left_for_cleanup.append(f"{guest.name} ({guest.vmid})")


def local_runner(api_factory: Callable[[], Any], inv: Inventory, opts: ApplyOptions, *,
                 bootstrap: Callable[[Inventory, Guest], StepResult] | None = None,
                 log: Log = _nolog) -> StepRunner:
    """A runner calling the steps directly (no Prefect): for tests and tools."""

    def run(step: str, guest: Guest, reason: str) -> StepResult:
        return run_step(step, api_factory(), inv, guest, opts, reason=reason,
                        bootstrap=bootstrap, log=log)

    return run


def run_step(step: str, api: Any, inv: Inventory, guest: Guest, opts: ApplyOptions, *,
             reason: str = "", bootstrap: Callable[[Inventory, Guest], StepResult] | None = None,
             log: Log = _nolog) -> StepResult:
    """Dispatch one step by name."""
    if step == "create":
        return create_guest(api, inv, guest, log=log)
    if step == "configure":
        return converge_guest(api, inv, guest, allow_restart=opts.allow_restart, log=log)
    if step == "start":
        return start_guest(api, inv, guest, log=log)
    if step == "wait-ssh":
        return wait_for_ssh(inv, guest, log=log)
    if step == "bootstrap":
        if bootstrap is None:
            return StepResult(guest.name, "bootstrap", "skipped", "no bootstrap runner")
        return bootstrap(inv, guest)
    if step == "protect":
        return protect_guest(api, inv, guest, log=log)
    if step == "destroy":
        return destroy_guest(api, inv, guest, log=log)
    if step == "cleanup":
        return cleanup_guest(api, inv, guest, reason, log=log)
    raise ValueError(f"unknown provisioning step {step!r}")


def results_table(results: Iterable[StepResult]) -> list[dict[str, Any]]:
    return [r.row() for r in results]
