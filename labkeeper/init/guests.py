"""One Proxmox guest as an inventory entry (pure): described exactly where the model can,
otherwise ``managed: false`` with the reasons; a managed entry is proven to round-trip
through provisioning's own comparison, so the first ``provision plan`` is empty."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from pydantic import ValidationError

from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.init.model import ClusterFacts, GuestFacts, InitOptions
from labkeeper.init.values import as_int, norm
from labkeeper.init.yamltext import Note
from labkeeper.inventory import Guest

GiB = 1024**3
_NAME_OK = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_TAG_OK = re.compile(r"[a-z0-9_][a-z0-9_+.-]{0,63}")
_NET = re.compile(r"net(\d+)")
_IPCONFIG = re.compile(r"ipconfig(\d+)")
LXC_NIC_KEYS = frozenset({"name", "bridge", "hwaddr", "ip", "gw", "ip6", "gw6", "tag",
                          "firewall", "mtu", "type"})
QEMU_NIC_KEYS = frozenset({"bridge", "tag", "firewall", "mtu", "macaddr", *pv.QEMU_MODELS})
COMMON_KEYS = frozenset({"cores", "memory", "onboot", "startup", "description", "tags",
                         "protection", "digest", "lock", "template", "ostype"})
LXC_KEYS = COMMON_KEYS | {"hostname", "swap", "rootfs", "features", "unprivileged", "arch"}
QEMU_KEYS = COMMON_KEYS | {
    "name", "sockets", "balloon", "ciuser", "cipassword", "sshkeys", "nameserver",
    "searchdomain", "ciupgrade", "citype",
    # hardware a clone inherits from its template
    "scsihw", "boot", "bootdisk", "agent", "vga", "bios", "machine", "cpu", "numa", "kvm",
    "efidisk0", "tpmstate0", "smbios1", "vmgenid", "meta", "hotplug", "tablet", "localtime",
    "keyboard", "acpi",
}
HARMLESS_DEFAULTS: Mapping[str, frozenset[str]] = {
    "console": frozenset({"1"}), "tty": frozenset({"2"}), "cmode": frozenset({"tty"}),
    "cpulimit": frozenset({"0"}), "cpuunits": frozenset({"100", "1024"}),
}
_QEMU_DRIVE = re.compile(r"(scsi|virtio|sata|ide)\d+")


def unmodelled(gtype: str, config: Mapping[str, Any], root_disk: str | None) -> list[str]:
    """Options of a guest's config that the inventory model cannot express."""
    known = LXC_KEYS if gtype == "lxc" else QEMU_KEYS
    out: list[str] = []
    for key in sorted(config):
        value = norm(config[key])
        if key in known or key == root_disk or _NET.fullmatch(key):
            continue
        if gtype == "qemu" and (_IPCONFIG.fullmatch(key) or key.startswith("serial")):
            continue
        if value in HARMLESS_DEFAULTS.get(key, ()):
            continue
        if gtype == "qemu" and _QEMU_DRIVE.fullmatch(key) and "media=cdrom" in value:
            continue  # CD-ROM and cloud-init drives come with the template
        shown = "(hidden)" if "password" in key else (value if len(value) <= 40
                                                      else value[:37] + "...")
        out.append(f"{key}={shown}")
    return out


def sanitize_name(text: str, vmid: int) -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    return name if _NAME_OK.fullmatch(name) else f"vm{vmid}"


def _lxc_nic(props: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    reasons = [f"NIC option {k}" for k in sorted(set(props) - LXC_NIC_KEYS)]
    if props.get("type", "veth") != "veth":
        reasons.append(f"NIC type {props['type']}")
    nic: dict[str, Any] = {"name": props.get("name", ""), "bridge": props.get("bridge", ""),
                           "ip": props.get("ip") or None}
    for key, out in (("gw", "gateway"), ("ip6", "ip6"), ("gw6", "gateway6"),
                     ("hwaddr", "mac")):
        if props.get(key):
            nic[out] = props[key]
    return _nic_common(nic, props), reasons


def _nic_common(nic: dict[str, Any], props: Mapping[str, str]) -> dict[str, Any]:
    if props.get("tag"):
        nic["vlan"] = as_int(props["tag"])
    if props.get("firewall") == "1":
        nic["firewall"] = True
    if props.get("mtu"):
        nic["mtu"] = as_int(props["mtu"])
    return nic


def _qemu_nic(props: Mapping[str, str], index: int) -> tuple[dict[str, Any], list[str]]:
    reasons = [f"NIC option {k}" for k in sorted(set(props) - QEMU_NIC_KEYS)]
    model = next((m for m in pv.QEMU_MODELS if m in props), None)
    nic: dict[str, Any] = {"name": f"net{index}"}
    if model is None:
        reasons.append("a NIC model labkeeper does not know")
    else:
        if model != "virtio":
            nic["model"] = model
        if props.get(model):
            nic["mac"] = props[model]
    nic["bridge"] = props.get("bridge", "")
    nic["ip"] = None
    return _nic_common(nic, props), reasons


def _network(gtype: str, config: Mapping[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    indexes = sorted(int(m.group(1)) for k in config if (m := _NET.fullmatch(k)))
    reasons: list[str] = []
    if indexes != list(range(len(indexes))):
        reasons.append("NICs are not numbered net0, net1, ... without gaps")
    nics: list[dict[str, Any]] = []
    for i in indexes:
        props = pv.parse_props(norm(config[f"net{i}"]))
        nic, why = _lxc_nic(props) if gtype == "lxc" else _qemu_nic(props, i)
        nics.append(nic)
        reasons += why
    if gtype == "qemu" and len(nics) == 1:
        nics[0].pop("name")
    return nics, reasons


def _cloud_init(config: Mapping[str, Any], nics: list[dict[str, Any]]
                ) -> tuple[dict[str, Any] | None, list[str], list[str]]:
    """(cloud_init, reasons, notes) of a QEMU config."""
    ipconf = sorted(int(m.group(1)) for k in config if (m := _IPCONFIG.fullmatch(k)))
    keys = {"ciuser", "sshkeys", "nameserver", "searchdomain", "ciupgrade", "cipassword"}
    if not ipconf and not keys & set(config):
        return None, [], []
    reasons: list[str] = []
    notes: list[str] = []
    ci: dict[str, Any] = {}
    if config.get("ciuser"):
        ci["user"] = norm(config["ciuser"])
    if config.get("sshkeys"):
        ci["ssh_keys"] = [k.strip() for k in unquote(norm(config["sshkeys"])).splitlines()
                          if k.strip()]
    if config.get("nameserver"):
        ci["nameservers"] = norm(config["nameserver"]).split()
    if config.get("searchdomain"):
        ci["searchdomain"] = norm(config["searchdomain"])
    ci["upgrade"] = norm(config.get("ciupgrade", "1")) != "0"
    if ipconf:
        if ipconf != list(range(len(ipconf))):
            reasons.append("ipconfig entries are not numbered ipconfig0, 1, ... without gaps")
        ci["ipconfig"] = [norm(config[f"ipconfig{i}"]) for i in ipconf]
        _addresses_from_ipconfig(ci["ipconfig"], nics)
    if "cipassword" in config:
        notes.append("Proxmox holds a cloud-init password for it (not read); to set one "
                     "on recreation add cloud_init.password as a reference (file:/...)")
    return ci, reasons, notes


def _addresses_from_ipconfig(ipconfigs: list[str], nics: list[dict[str, Any]]) -> None:
    for text, nic in zip(ipconfigs, nics, strict=False):
        props = pv.parse_props(text)
        for key, out in (("ip", "ip"), ("gw", "gateway"), ("ip6", "ip6"), ("gw6", "gateway6")):
            if props.get(key):
                nic[out] = props[key]


def _resources(gtype: str, config: Mapping[str, Any], fallback_storage: str | None
               ) -> tuple[dict[str, Any], list[str]]:
    reasons: list[str] = []
    res: dict[str, Any] = {}
    if config.get("cores") is not None:
        res["cores"] = as_int(config["cores"])
    elif gtype == "lxc":
        reasons.append("no CPU limit (cores unset); labkeeper always sets cores")
    keys = (("sockets", "sockets"), ("memory", "memory_mb"), ("swap", "swap_mb"),
            ("balloon", "balloon_mb"))
    for key, out in keys:
        if config.get(key) is None:
            continue
        value = as_int(config[key])
        if value is None:
            reasons.append(f"{key} {config[key]!r} is not a number")
        else:
            res[out] = value
    if gtype == "qemu" and config.get("memory") is None:
        reasons.append("memory unset (labkeeper always sets it)")
    dkey = pv.disk_key(gtype, config)
    if dkey is None:
        reasons.append("no root disk")
        res["storage"] = fallback_storage or "local"
        return res, reasons
    storage, size = pv.disk_size(config[dkey])
    if size % GiB or size == 0:
        reasons.append(f"root disk size {norm(config[dkey]).split('size=')[-1]} is not a "
                       "whole number of GiB")
    res["disk_gb"] = max(1, math.ceil(size / GiB))
    res["storage"] = storage
    return res, reasons


def _startup(config: Mapping[str, Any]) -> tuple[int | None, list[str]]:
    text = norm(config.get("startup"))
    if not text:
        return None, []
    props = pv.parse_props(text)
    order = as_int(props.get("order", "x"))
    if set(props) != {"order"} or order is None:
        return None, [f"startup {text!r} (only order=N is modelled)"]
    return order, []


def _features(config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    props = pv.parse_props(norm(config.get("features")))
    extra = sorted(set(props) - {"nesting", "keyctl", "fuse", "mount"})
    feats: dict[str, Any] = {k: True for k in ("nesting", "keyctl", "fuse") if props.get(k) == "1"}
    if props.get("mount"):
        feats["mount"] = props["mount"].split(";")
    return (feats or None), [f"LXC feature {k}" for k in extra]


@dataclass(frozen=True)
class Described:
    """One guest as the inventory will hold it."""

    data: dict[str, Any]
    reasons: tuple[str, ...] = ()
    """Why it cannot be managed (empty: described exactly)."""
    notes: tuple[str, ...] = ()
    tagged: bool = False

    @property
    def managed(self) -> bool:
        return not self.reasons and self.tagged


def _identity(res: px.Guest, config: Mapping[str, Any], managed_tag: str
              ) -> tuple[dict[str, Any], list[str]]:
    raw = norm(config.get("hostname" if res.type == "lxc" else "name")) or res.name
    reasons: list[str] = []
    name = raw
    if not _NAME_OK.fullmatch(raw):
        name = sanitize_name(raw, res.vmid)
        reasons.append(f"its name {raw!r} is not a hostname label (named {name!r} here)")
    tags = [t for t in res.tags if t != managed_tag]
    bad = [t for t in tags if not _TAG_OK.fullmatch(t)]
    if bad:
        reasons.append(f"tags labkeeper cannot write: {', '.join(bad)}")
    data: dict[str, Any] = {"name": name, "vmid": res.vmid, "type": res.type, "node": res.node}
    if [t for t in tags if t not in bad]:
        data["tags"] = [t for t in tags if t not in bad]
    if res.pool:
        data["pool"] = res.pool
    return data, reasons


def _options(gtype: str, config: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    data: dict[str, Any] = {}
    reasons: list[str] = []
    data["onboot"] = norm(config.get("onboot")) == "1"
    order, why = _startup(config)
    reasons += why
    if order is not None:
        data["startup_order"] = order
    description = norm(config.get("description"))
    if description:
        data["description"] = description
    if norm(config.get("protection")) == "1":
        data["protection"] = True
    if gtype == "lxc":
        data["unprivileged"] = norm(config.get("unprivileged")) == "1"
        feats, why = _features(config)
        reasons += why
        if feats:
            data["features"] = feats
    return data, reasons


def describe_guest(g: GuestFacts, *, managed_tag: str, template: str | None,
                   fallback_storage: str | None) -> Described:
    """The inventory entry of one guest, and why it cannot be managed (pure)."""
    res, config = g.resource, g.config
    data, reasons = _identity(res, config, managed_tag)
    notes: list[str] = []
    if res.template or norm(config.get("template")) == "1":
        reasons.insert(0, "a template (the source of clones, not a guest to run)")
    elif res.status != "running":
        reasons.append(f"{res.status}: labkeeper keeps its guests running (the inventory "
                       "has no 'stopped' state)")
    resources, why = _resources(res.type, config, fallback_storage)
    reasons += why
    data["resources"] = resources
    nics, why = _network(res.type, config)
    reasons += why
    data["network"] = nics
    options, why = _options(res.type, config)
    reasons += why
    data.update(options)
    if res.type == "qemu":
        ci, why, ci_notes = _cloud_init(config, nics)
        reasons += why
        notes += ci_notes
        if ci is not None:
            data["cloud_init"] = ci
    other = unmodelled(res.type, config, pv.disk_key(res.type, config))
    if other:
        reasons.append("options labkeeper does not model: " + ", ".join(other))
    if template is not None:
        data["template"] = template
    elif managed_tag in res.tags and not res.template:
        reasons.append("no template in the cluster to recreate it from (Proxmox does not "
                       "record it)")
    if norm(config.get("lock")):
        notes.append(f"locked ({norm(config['lock'])}) when it was read")
    tagged = managed_tag in res.tags
    return _checked(Described(data, tuple(reasons), tuple(notes), tagged), config, managed_tag)


def _checked(d: Described, config: Mapping[str, Any], managed_tag: str) -> Described:
    """Validate the entry; prove with provisioning's comparison that it round-trips."""
    try:
        guest = Guest.model_validate({**d.data, "managed": d.managed})
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors(include_input=False, include_url=False)]
        return Described(_fallback(d.data), (*d.reasons, *problems), d.notes, d.tagged)
    if d.reasons:
        return d
    have = re.split(r"[;,\s]+", norm(config.get("tags")))
    tags = ";".join(sorted({*(t for t in have if t), managed_tag}))
    changes = pv.config_changes(guest, managed_tag, {**config, "tags": tags}, running=True)
    if changes:
        return Described(d.data, ("the plan would change: "
                                  + "; ".join(c.text() for c in changes),), d.notes, d.tagged)
    return d


def _fallback(data: Mapping[str, Any]) -> dict[str, Any]:
    """The least that validates: identity and root disk (the reason says what is missing)."""
    res = data.get("resources", {})
    keep = {k: data[k] for k in ("name", "vmid", "type", "node") if k in data}
    keep["resources"] = {k: res[k] for k in ("disk_gb", "storage") if k in res}
    return keep


def guess_template(g: GuestFacts, facts: ClusterFacts) -> tuple[str | None, str]:
    """A template to recreate the guest from (Proxmox does not record it), and why."""
    if g.resource.template:
        return None, ""
    if g.resource.type == "qemu":
        tmpl = sorted(x.resource.vmid for x in facts.guests
                      if x.resource.type == "qemu" and x.resource.template)
        if not tmpl:
            return None, ""
        return str(tmpl[0]), ("TODO: Proxmox does not record which template a VM was cloned "
                              f"from; {tmpl[0]} is a guess (used only to recreate it)")
    ostype = norm(g.config.get("ostype"))
    names = [v for v in facts.templates.get(g.resource.node, ())
             if ostype and v.split("/", 1)[-1].startswith(ostype)]
    if not names:
        return None, ""
    return sorted(names)[-1], ("TODO: Proxmox does not record a container's template; this "
                               f"{ostype} one is a guess (used only to recreate it)")


def guest_entries(facts: ClusterFacts, opts: InitOptions, storages: set[str]) -> list[Any]:
    entries: list[Any] = []
    names: set[str] = set()
    ips: dict[str, str] = {}
    fallback = next(iter(sorted(storages)), None)
    for g in sorted(facts.guests, key=lambda x: x.resource.vmid):
        template, why_template = guess_template(g, facts)
        d = describe_guest(g, managed_tag=opts.managed_tag, template=template,
                           fallback_storage=fallback)
        d = _unique(d, names, ips, storages)
        entries.append(_guest_note(d, g, opts, why_template))
    return entries


def _unique(d: Described, names: set[str], ips: dict[str, str], storages: set[str]
            ) -> Described:
    data = dict(d.data)
    reasons = list(d.reasons)
    if data["name"] in names:
        data["name"] = f"{data['name'][:50]}-{data['vmid']}"
        reasons.append("another guest has the same name")
    names.add(data["name"])
    if data.get("resources", {}).get("storage") not in storages:
        reasons.append(f"its disk is on storage {data['resources'].get('storage')!r}, "
                       "which the inventory cannot declare")
        fallback = next(iter(sorted(storages)), data["resources"].get("storage"))
        data["resources"] = {**data["resources"], "storage": fallback}
    for nic in data.get("network", []):
        ip = str(nic.get("ip") or "").split("/")[0]
        if ip and ip[0].isdigit() and ip in ips:
            reasons.append(f"address {ip} is also used by {ips[ip]}")
            data["network"] = []
            break
        if ip and ip[0].isdigit():
            ips[ip] = data["name"]
    if reasons == list(d.reasons) and data == d.data:
        return d
    return Described(data, tuple(reasons), d.notes, d.tagged)


def _guest_note(d: Described, g: GuestFacts, opts: InitOptions, why_template: str) -> Note:
    data: dict[str, Any] = dict(d.data)
    above: list[str] = []
    res = g.resource
    if d.reasons:
        data["managed"] = False
        above.append(f"{res.type} {res.vmid} on {res.node}: UNMANAGED — "
                     + "; ".join(d.reasons))
        above.append("described as far as the inventory model goes; provisioning never "
                     "touches it")
    elif not d.tagged:
        data["managed"] = False
        cmd = "pct" if res.type == "lxc" else "qm"
        tags = ";".join([*data.get("tags", []), opts.managed_tag])
        above.append(f"{res.type} {res.vmid} on {res.node}: described exactly as Proxmox has it.")
        above.append(f"TODO adopt: to let labkeeper manage it, run `{cmd} set {res.vmid} "
                     f"--tags '{tags}'` on {res.node} and delete `managed: false`")
        if "template" not in data:
            above.append("and give it a template (to recreate it from); the plan stays empty")
        else:
            above.append("(the plan stays empty)")
    else:
        above.append(f"{res.type} {res.vmid} on {res.node}: managed by labkeeper "
                     f"(tagged {opts.managed_tag!r})")
    above += list(d.notes)
    if "template" in data and why_template:
        data["template"] = Note(data["template"], why_template)
    first = [k for k in ("name", "vmid", "type", "node", "managed", "template") if k in data]
    ordered = {k: data[k] for k in first} | {k: v for k, v in data.items() if k not in first}
    return Note(ordered, above=tuple(above))
