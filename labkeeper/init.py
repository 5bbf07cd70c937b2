"""``labkeeper init``: describe an existing lab as a commented inventory.

Pure at the core: :func:`render_inventory` turns what was read (:class:`ClusterFacts`,
database names, :class:`InitOptions`) into YAML text with comments — guests exactly
as Proxmox has them (checked with provisioning's own comparison, so the first
``provision plan`` is empty), templates and guests the inventory model cannot
describe faithfully marked ``managed: false`` with the reason, Proxmox's backup
jobs as ``vzdump_jobs``, databases with a repository placeholder, secrets only as
references and ``TODO`` where a person must decide. The reading part
(:func:`read_cluster`, :func:`read_databases`) sends GET requests and one SELECT.

:func:`token_commands` prints the least-privilege ``pveum`` commands from
:data:`labkeeper.proxmox.REQUIRED_PRIVILEGES` (the admin guide shows the same).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import ValidationError

from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError
from labkeeper.inventory import Guest, Inventory, check_cron, parse_inventory, validate_text
from labkeeper.secrets import check_reference

GiB = 1024**3
DEFAULT_REPOSITORY = "main"
STORAGE_TYPES = frozenset({"dir", "lvmthin", "lvm", "zfspool", "nfs", "cifs", "pbs", "cephfs",
                           "rbd", "btrfs", "glusterfs", "iscsi", "zfs"})
STORAGE_CONTENT = ("images", "rootdir", "vztmpl", "backup", "iso", "snippets", "import")


class InitError(ConfigError):
    """``labkeeper init`` cannot write the inventory (bad options, an existing file...)."""


# ====================================================================== YAML with comments


@dataclass(frozen=True)
class Note:
    """A value with comments: ``above`` lines before its key, ``comment`` after it."""

    value: Any
    comment: str = ""
    above: tuple[str, ...] = ()


_PLAIN = re.compile(r"[A-Za-z0-9_./@+~-]+")


def scalar(value: Any) -> str:
    """One YAML scalar; strings stay plain only where every YAML reader keeps them strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and _reads_back(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _reads_back(text: str) -> bool:
    try:
        return bool(yaml.safe_load(text) == text)
    except yaml.YAMLError:
        return False


def _unwrap(raw: Any) -> tuple[Any, str, tuple[str, ...]]:
    if isinstance(raw, Note):
        return raw.value, raw.comment, raw.above
    return raw, "", ()


def _is_block(value: Any) -> bool:
    if isinstance(value, Mapping):
        return bool(value)
    if isinstance(value, list):
        return any(isinstance(_unwrap(v)[0], Mapping) or isinstance(v, Note) for v in value)
    return False


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(scalar(_unwrap(v)[0]) for v in value) + "]"
    return scalar(value)


def _comments(lines: Iterable[str], pad: str) -> list[str]:
    return [f"{pad}# {c}".rstrip() for c in lines]


def emit(value: Any, indent: int = 0) -> list[str]:
    """YAML lines for a mapping or a list (values may be :class:`Note`)."""
    if isinstance(value, Mapping):
        return _emit_map(value, indent)
    return _emit_list(value, indent)


def _emit_map(mapping: Mapping[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, raw in mapping.items():
        value, comment, above = _unwrap(raw)
        lines += _comments(above, pad)
        tail = f"  # {comment}" if comment else ""
        if _is_block(value):
            lines.append(f"{pad}{key}:{tail}")
            lines += emit(value, indent + 2)
        else:
            lines.append(f"{pad}{key}: {_inline(value)}{tail}")
    return lines


def _emit_list(items: Sequence[Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for raw in items:
        value, comment, above = _unwrap(raw)
        lines += _comments(above, pad)
        tail = f"  # {comment}" if comment else ""
        if isinstance(value, Mapping) and value:
            body = _emit_map(value, indent + 2)
            lines.append(f"{pad}- {body[0][indent + 2:]}{tail}")
            lines += body[1:]
        else:
            lines.append(f"{pad}- {_inline(value)}{tail}")
    return lines


# ====================================================================== what was read


@dataclass(frozen=True)
class StorageFacts:
    name: str
    type: str
    content: tuple[str, ...]
    nodes: tuple[str, ...]
    shared: bool = False


@dataclass(frozen=True)
class GuestFacts:
    resource: px.Guest
    config: Mapping[str, Any]


@dataclass(frozen=True)
class ClusterFacts:
    nodes: tuple[str, ...]
    guests: tuple[GuestFacts, ...]
    storages: tuple[StorageFacts, ...]
    templates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Container template volids by node."""
    backup_jobs: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str | None
    """A secret reference, never the password."""


@dataclass(frozen=True)
class InitOptions:
    lab_name: str = "homelab"
    proxmox_host: str | None = None
    proxmox_port: int = 8006
    token_id: str | None = None
    token_secret: str | None = None
    fingerprint: str | None = None
    ca_file: str | None = None
    postgres: PgServer | None = None
    managed_tag: str = "labkeeper"
    repository_url: str | None = None
    repository_password: str = "file:/etc/labkeeper/restic-password"  # noqa: S105 - a reference


def parse_proxmox_url(url: str) -> tuple[str, int]:
    """``https://pve1:8006`` / ``pve1:8006`` / ``pve1`` → (host, port)."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.hostname:
        raise InitError(f"--proxmox: not a host or URL: {url!r}")
    try:
        port = parts.port or 8006
    except ValueError:
        raise InitError(f"--proxmox: bad port in {url!r}") from None
    return parts.hostname, port


def parse_host_port(text: str, default_port: int = 5432) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    if not port.isdigit():
        raise InitError(f"--postgres: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def check_ref(option: str, ref: str | None) -> str | None:
    """A secret option must be a reference; the message never echoes the value."""
    if ref is None:
        return None
    try:
        return check_reference(ref)
    except ValueError:
        raise InitError(f"{option} must be a secret reference (env:NAME, file:/path or "
                        "prefect-block:NAME), never the secret itself (the value is not "
                        "shown)") from None


# ====================================================================== guests

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


def _norm(value: Any) -> str:
    """PVE's value as text, as provisioning compares it (``1.0`` → ``1``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    try:
        return int(float(str(value)))
    except ValueError:
        return None


def unmodelled(gtype: str, config: Mapping[str, Any], root_disk: str | None) -> list[str]:
    """Options of a guest's config that the inventory model cannot express."""
    known = LXC_KEYS if gtype == "lxc" else QEMU_KEYS
    out: list[str] = []
    for key in sorted(config):
        value = _norm(config[key])
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
        nic["vlan"] = _int(props["tag"])
    if props.get("firewall") == "1":
        nic["firewall"] = True
    if props.get("mtu"):
        nic["mtu"] = _int(props["mtu"])
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
        props = pv.parse_props(_norm(config[f"net{i}"]))
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
        ci["user"] = _norm(config["ciuser"])
    if config.get("sshkeys"):
        ci["ssh_keys"] = [k.strip() for k in unquote(_norm(config["sshkeys"])).splitlines()
                          if k.strip()]
    if config.get("nameserver"):
        ci["nameservers"] = _norm(config["nameserver"]).split()
    if config.get("searchdomain"):
        ci["searchdomain"] = _norm(config["searchdomain"])
    ci["upgrade"] = _norm(config.get("ciupgrade", "1")) != "0"
    if ipconf:
        if ipconf != list(range(len(ipconf))):
            reasons.append("ipconfig entries are not numbered ipconfig0, 1, ... without gaps")
        ci["ipconfig"] = [_norm(config[f"ipconfig{i}"]) for i in ipconf]
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
        res["cores"] = _int(config["cores"])
    elif gtype == "lxc":
        reasons.append("no CPU limit (cores unset); labkeeper always sets cores")
    keys = (("sockets", "sockets"), ("memory", "memory_mb"), ("swap", "swap_mb"),
            ("balloon", "balloon_mb"))
    for key, out in keys:
        if config.get(key) is None:
            continue
        value = _int(config[key])
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
        reasons.append(f"root disk size {_norm(config[dkey]).split('size=')[-1]} is not a "
                       "whole number of GiB")
    res["disk_gb"] = max(1, math.ceil(size / GiB))
    res["storage"] = storage
    return res, reasons


def _startup(config: Mapping[str, Any]) -> tuple[int | None, list[str]]:
    text = _norm(config.get("startup"))
    if not text:
        return None, []
    props = pv.parse_props(text)
    order = _int(props.get("order", "x"))
    if set(props) != {"order"} or order is None:
        return None, [f"startup {text!r} (only order=N is modelled)"]
    return order, []


def _features(config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, list[str]]:
    props = pv.parse_props(_norm(config.get("features")))
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
    raw = _norm(config.get("hostname" if res.type == "lxc" else "name")) or res.name
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
    data["onboot"] = _norm(config.get("onboot")) == "1"
    order, why = _startup(config)
    reasons += why
    if order is not None:
        data["startup_order"] = order
    description = _norm(config.get("description"))
    if description:
        data["description"] = description
    if _norm(config.get("protection")) == "1":
        data["protection"] = True
    if gtype == "lxc":
        data["unprivileged"] = _norm(config.get("unprivileged")) == "1"
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
    if res.template or _norm(config.get("template")) == "1":
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
    if _norm(config.get("lock")):
        notes.append(f"locked ({_norm(config['lock'])}) when it was read")
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
    have = re.split(r"[;,\s]+", _norm(config.get("tags")))
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
    ostype = _norm(g.config.get("ostype"))
    names = [v for v in facts.templates.get(g.resource.node, ())
             if ostype and v.split("/", 1)[-1].startswith(ostype)]
    if not names:
        return None, ""
    return sorted(names)[-1], ("TODO: Proxmox does not record a container's template; this "
                               f"{ostype} one is a guess (used only to recreate it)")


# ====================================================================== sections


def _storage_section(facts: ClusterFacts) -> tuple[list[Any], set[str]]:
    out: list[Any] = []
    declared: set[str] = set()
    for s in facts.storages:
        content = [c for c in STORAGE_CONTENT if c in s.content]
        if s.type not in STORAGE_TYPES or not content:
            why = (f"type {s.type}" if s.type not in STORAGE_TYPES
                   else f"content {','.join(s.content) or 'none'}")
            out.append(Note(None, above=(f"storage {s.name} left out: its {why} is not "
                                         "modelled",)))
            continue
        entry: dict[str, Any] = {"name": s.name, "type": s.type, "content": content}
        if s.shared:
            entry["shared"] = True
        if set(s.nodes) != set(facts.nodes):
            entry["nodes"] = sorted(s.nodes)
        out.append(entry)
        declared.add(s.name)
    return out, declared


def _guest_entries(facts: ClusterFacts, opts: InitOptions, storages: set[str]) -> list[Any]:
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


def _retention(job: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    raw = job.get("prune-backups")
    if isinstance(raw, str):
        raw = pv.parse_props(raw)
    keep: dict[str, Any] = {}
    for key, value in dict(raw or {}).items():
        n = _int(value)
        if key == "keep-all" and n:
            return {"keep_all": True}, ""
        if key.startswith("keep-") and n:
            keep[key.replace("-", "_")] = n
    if keep:
        return keep, ""
    return {"keep_all": True}, ("TODO: the Proxmox job has no retention of its own (the "
                                "storage's prune-backups applied): choose keep_* here")


_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_SHORTHANDS = {"minutely": "* * * * *", "hourly": "0 * * * *", "daily": "0 0 * * *",
               "weekly": "0 0 * * 1", "monthly": "0 0 1 * *", "yearly": "0 0 1 1 *",
               "annually": "0 0 1 1 *"}


def _cal_field(text: str, lo: int, hi: int) -> str | None:
    """One PVE calendar hour/minute field (``06,18``, ``*/15``, ``2..5``) as cron."""
    out: list[str] = []
    for item in text.split(","):
        base, slash, step = item.partition("/")
        a, dots, b = base.partition("..")
        if not all(x == "*" or x.isdigit() for x in (a, b) if x):
            return None
        if any(x.isdigit() and not lo <= int(x) <= hi for x in (a, b)):
            return None
        part = a if a == "*" else str(int(a))
        if dots:
            part = f"{int(a)}-{int(b)}"
        if slash:
            if not step.isdigit():
                return None
            part = f"{part}/{int(step)}"
        out.append(part)
    return ",".join(out)


def _cal_days(text: str) -> str | None:
    out: list[str] = []
    for item in text.split(","):
        a, dots, b = item.partition("..")
        if a not in _DAYS or (dots and b not in _DAYS):
            return None
        if not dots:
            out.append(str(_DAYS[a]))
        elif _DAYS[a] <= _DAYS[b]:
            out.append(f"{_DAYS[a]}-{_DAYS[b]}")
        else:  # sat..mon wraps over sunday
            out += [f"{_DAYS[a]}-6", f"0-{_DAYS[b]}"]
    return ",".join(out)


def calendar_to_cron(event: str) -> str | None:
    """A PVE calendar event (``sat 15:00``, ``mon..fri 02:30``, ``06,18:30``, ``daily``)
    as a 5-field cron expression; None when it has no cron equivalent (dates, seconds)."""
    text = " ".join(event.strip().lower().split())
    if text in _SHORTHANDS:
        return _SHORTHANDS[text]
    parts = text.split(" ")
    days = "*"
    if parts and parts[0][:3] in _DAYS and ":" not in parts[0]:
        days = _cal_days(parts.pop(0)) or ""
    if not days or len(parts) > 1:
        return None
    hour, sep, minute = (parts[0] if parts else "0:0").partition(":")
    if not sep:  # a lone component is minutes (``*/15``)
        hour, minute = "*", hour
    h, m = _cal_field(hour, 0, 23), _cal_field(minute, 0, 59)
    if h is None or m is None:
        return None
    try:
        return check_cron(f"{m} {h} * * {days}")
    except ValueError:
        return None


JOB_KEYS = frozenset({"id", "type", "schedule", "enabled", "storage", "vmid", "all", "pool",
                      "node", "mode", "compress", "prune-backups", "notes-template",
                      "exclude", "next-run", "comment"})


def _unique_name(job_id: str, taken: set[str]) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", job_id.lower()).strip("-_")[:55] or "job"
    if not name[0].isalnum():
        name = "j" + name
    base, n = name, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name


def _selection(job: Mapping[str, Any], vmids: set[int]) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    sel: dict[str, Any] = {}
    listed = [int(v) for v in re.split(r"[,;\s]+", str(job.get("vmid") or "")) if v.isdigit()]
    excluded = [int(v) for v in re.split(r"[,;\s]+", str(job.get("exclude") or ""))
                if v.isdigit()]
    gone = sorted({*listed, *excluded} - vmids)
    if gone:
        notes.append(f"vmids no longer in the cluster left out: {', '.join(map(str, gone))}")
    if _int(job.get("all", 0)):
        sel["all"] = True
    elif listed:
        sel["vmids"] = [v for v in listed if v in vmids]
    if job.get("pool") and "vmids" not in sel:
        sel["pool"] = str(job["pool"])
    if job.get("node"):
        sel["node"] = str(job["node"])
    if [v for v in excluded if v in vmids]:
        sel["exclude"] = [v for v in excluded if v in vmids]
    return sel, notes


def describe_job(job: Mapping[str, Any], *, name: str, vmids: set[int],
                 backup_storages: set[str]) -> Note:
    """One Proxmox backup job as a ``vzdump_jobs`` entry (pure)."""
    jid = str(job.get("id", name))
    above = [f"Proxmox backup job {jid} (schedule {job.get('schedule', '?')!r}, "
             f"{'enabled' if _int(job.get('enabled', 1)) else 'disabled'} in Proxmox)."]
    sel, notes = _selection(job, vmids)
    data: dict[str, Any] = {"name": name, "selection": sel, "storage": job.get("storage")}
    data["mode"] = str(job.get("mode") or "snapshot")
    data["compress"] = str(job.get("compress") or "0")
    retention, todo = _retention(job)
    data["retention"] = Note(retention, todo) if todo else retention
    cron = calendar_to_cron(str(job.get("schedule") or "00:00"))
    data["schedule"] = cron or Note("0 1 * * *", "TODO: the Proxmox schedule "
                                    f"{job.get('schedule')!r} has no cron equivalent: set one")
    data["notes_template"] = str(job.get("notes-template") or "")
    data["enabled"] = Note(False, "TODO: decide who runs it (see above)")
    above += notes
    above += [
        "Proxmox runs it now, so labkeeper does not (enabled: false): `labkeeper vzdump run "
        f"{name}` still runs it on demand, verified.",
        "TODO: to let labkeeper run it on schedule (each archive verified, retention after "
        "verification, status and metrics), set enabled: true and disable the Proxmox job "
        f"(pvesh set /cluster/backup/{jid} --enabled 0); keeping both doubles the backups.",
    ]
    extra = sorted(k for k in job if k not in JOB_KEYS)
    if extra:
        above.append("not carried over from Proxmox: " + ", ".join(
            f"{k}={job[k]}" for k in extra))
    return _job_or_comment(data, above, sel, backup_storages)


def _job_or_comment(data: dict[str, Any], above: list[str], sel: Mapping[str, Any],
                    backup_storages: set[str]) -> Note:
    problem = ""
    if data["storage"] not in backup_storages:
        problem = f"its storage {data['storage']!r} holds no backups in the inventory"
    elif not sel:
        problem = "it selects no guest that exists"
    if not problem:
        return Note(data, above=tuple(above))
    body = ["not imported: " + problem + ". As it would read:"]
    body += emit([data])
    return Note(None, above=(*above, *body))


def _jobs_section(facts: ClusterFacts, storages: Sequence[Any],
                  refused: Mapping[str, str]) -> list[Any]:
    vmids = {g.resource.vmid for g in facts.guests}
    backup = {s["name"] for s in storages if isinstance(s, Mapping) and "backup" in s["content"]}
    taken: set[str] = set()
    out: list[Any] = []
    for job in facts.backup_jobs:
        if str(job.get("type", "vzdump")) != "vzdump":
            continue
        name = _unique_name(str(job.get("id", "job")), taken)
        note = describe_job(job, name=name, vmids=vmids, backup_storages=backup)
        if name in refused and note.value is not None:
            note = Note(None, above=(*note.above, f"not imported: {refused[name]}. As it "
                                     "would read:", *emit([note.value])))
        out.append(note)
    return out


# ====================================================================== the document


def _header(opts: InitOptions, facts: ClusterFacts | None) -> list[str]:
    lines = ["# labkeeper inventory, written by `labkeeper init`.",
             "# Check it with `labkeeper validate FILE`. Secrets are references only",
             "# (env:NAME, file:/path, prefect-block:NAME), never values.",
             "# Lines with TODO need a person's decision."]
    if facts is not None:
        lines.append(f"# Read from Proxmox at {opts.proxmox_host}: {len(facts.nodes)} node(s), "
                     f"{len(facts.guests)} guest(s), {len(facts.backup_jobs)} backup job(s).")
    else:
        lines.append("# Database backups only: no Proxmox, no SSH needed.")
    return lines


def _lab(opts: InitOptions) -> dict[str, Any]:
    why = "TODO: your time zone (schedules run in it"
    why += "; Proxmox job schedules were in the nodes' time zone)" if opts.proxmox_host else ")"
    return {"name": opts.lab_name, "timezone": Note("UTC", why)}


def _proxmox(opts: InitOptions, facts: ClusterFacts, storages: list[Any]) -> dict[str, Any]:
    tls: dict[str, Any] = {}
    if opts.fingerprint:
        tls["fingerprint"] = opts.fingerprint
    if opts.ca_file:
        tls["ca_file"] = opts.ca_file
    section: dict[str, Any] = {
        "host": opts.proxmox_host, "port": opts.proxmox_port, "token_id": opts.token_id,
        "token_secret": Note(opts.token_secret, "a reference, never the secret"),
    }
    if tls:
        section["tls"] = tls
    else:
        section["tls"] = Note({}, "verified against the system CAs; with PVE's self-signed "
                                  "certificate set ca_file or fingerprint")
    section["nodes"] = Note([{"name": n} for n in facts.nodes],
                            above=("TODO: give each node an address (SSH, for off-site "
                                   "copies of vzdump archives)",))
    section["storages"] = _section(storages)
    return section


def _repositories(opts: InitOptions) -> list[Any]:
    url = opts.repository_url or f"/var/backups/restic/{opts.lab_name}"
    return [Note({
        "name": DEFAULT_REPOSITORY,
        "url": Note(url, "TODO: where backups go; off-site: b2:BUCKET:path or "
                         "s3:https://ENDPOINT/BUCKET/path (with an s3 section)"),
        "password": Note(opts.repository_password,
                         "TODO: create this file (mode 0600) with the restic password"),
    }, above=("Repository placeholder: a local path works to start.",))]


def _databases(opts: InitOptions, names: Sequence[str]) -> list[Any]:
    pg = opts.postgres or PgServer("127.0.0.1", 5432, "postgres",
                                   "file:/etc/labkeeper/pg-password")
    out: list[Any] = []
    taken: set[str] = set()
    for dbname in names or ("app",):
        name = _unique_name(dbname, taken)
        entry: dict[str, Any] = {"name": name}
        if name != dbname:
            entry["dbname"] = dbname
        entry.update({"host": pg.host, "port": pg.port, "user": pg.user})
        if pg.password:
            entry["password"] = Note(pg.password, "a reference, never the password")
        entry["repository"] = Note(DEFAULT_REPOSITORY, "the placeholder repository above")
        out.append(entry)
    if not names:
        out[0] = Note(out[0], above=("TODO: an example: name your database, its server and "
                                     "the backup user (one that may read every table)",))
    return out


def _drills(facts: ClusterFacts) -> dict[str, Any] | None:
    vmids = {g.resource.vmid for g in facts.guests}
    if not any(9900 <= v <= 9999 for v in vmids):
        return None
    first = (max(vmids) // 100 + 1) * 100
    return {"guests": {"scratch_vmids": Note({"first": first, "last": first + 99},
                                             "free vmids where guest drills restore copies")}}


def render_inventory(opts: InitOptions, facts: ClusterFacts | None = None,
                     databases: Sequence[str] = (), *,
                     refused_jobs: Mapping[str, str] | None = None) -> str:
    """The commented inventory text (pure). ``refused_jobs``: job name → why it is
    written as a comment only."""
    doc: dict[str, Any] = {"version": 1, "lab": _lab(opts)}
    if facts is not None:
        storages, declared = _storage_section(facts)
        doc["proxmox"] = _proxmox(opts, facts, storages)
        guests = _guest_entries(facts, opts, declared)
        doc["guests"] = Note(guests, above=(
            "Every guest Proxmox has. `labkeeper provision plan` on this file changes "
            "nothing;", "guests with managed: false are never created, changed or destroyed."))
        jobs = _jobs_section(facts, storages, refused_jobs or {})
        if jobs:
            doc["vzdump_jobs"] = _section(jobs)
        drills = _drills(facts)
        if drills:
            doc["drills"] = drills
    if facts is None or databases or opts.postgres is not None:
        doc["repositories"] = _repositories(opts)
        doc["databases"] = _databases(opts, databases)
    lines = [*_header(opts, facts), "", *emit(doc)]
    return "\n".join(_drop_empty(lines)) + "\n"


def _section(items: list[Any]) -> Any:
    """A list whose entries may all be comments (nothing imported) becomes ``[]``."""
    if any(_unwrap(i)[0] is not None for i in items):
        return items
    return Note([], above=tuple(c for i in items for c in _unwrap(i)[2]))


def _drop_empty(lines: list[str]) -> list[str]:
    """A list item that is only comments (a job not imported) leaves ``- null``: drop it."""
    return [line for line in lines if line.strip() != "- null"]


def render_valid(opts: InitOptions, facts: ClusterFacts | None = None,
                 databases: Sequence[str] = ()) -> str:
    """:func:`render_inventory`, with a job the inventory refuses (a storage missing on
    its node...) turned into a comment that says why (pure)."""
    text = render_inventory(opts, facts, databases)
    doc = yaml.safe_load(text)
    refused: dict[str, str] = {}
    for problem in validate_text(text):
        loc = problem.loc
        if len(loc) > 1 and loc[0] == "vzdump_jobs" and isinstance(loc[1], int):
            name = doc["vzdump_jobs"][loc[1]]["name"]
            refused.setdefault(name, f"{problem.path}: {problem.message}")
    if not refused:
        return text
    return render_inventory(opts, facts, databases, refused_jobs=refused)


def validate_rendered(text: str, filename: str) -> Inventory:
    """The rendered text, parsed and validated as every inventory is."""
    return parse_inventory(text, filename)


def summary(inv: Inventory) -> str:
    managed = sum(1 for g in inv.guests if g.managed)
    return (f"{len(inv.guests)} guest(s) ({managed} managed, {len(inv.guests) - managed} "
            f"managed: false), {len(inv.vzdump_jobs)} vzdump job(s), "
            f"{len(inv.databases)} database(s)")


# ====================================================================== pveum commands


def token_commands(user: str = "labkeeper@pve", name: str = "automation",
                   role: str = "LabKeeper") -> list[str]:
    """The least-privilege role, user and token, as ``pveum`` commands (pure)."""
    privs = " ".join(px.REQUIRED_PRIVILEGES)
    return [
        f'pveum role add {role} --privs "{privs}"',
        f"pveum user add {user}",
        f"pveum aclmod / --users {user} --roles {role}",
        f"pveum user token add {user} {name} --privsep 1",
        f"pveum aclmod / --tokens '{user}!{name}' --roles {role}",
    ]


# ====================================================================== reading (GET only)


def read_cluster(api: Any) -> ClusterFacts:
    """What init needs from the cluster, with GET requests only."""
    nodes = tuple(sorted(px.node_names(api)))
    resources = px.list_guests(api)
    guests = tuple(GuestFacts(r, px.guest_config(api, r.node, r.vmid, r.type).values)
                   for r in resources)
    storages = storages_of(px.send(api, px.resources_request("storage")) or [])
    templates: dict[str, tuple[str, ...]] = {}
    for node in nodes:
        vols: list[str] = []
        for s in storages:
            if "vztmpl" in s.content and node in s.nodes:
                vols += [v.volid for v in px.storage_content(api, node, s.name,
                                                             content="vztmpl")]
        templates[node] = tuple(sorted(vols))
    jobs = tuple(dict(j) for j in px.send(api, px.backup_jobs_request()) or [])
    return ClusterFacts(nodes, guests, storages, templates, jobs)


def storages_of(resources: Iterable[Mapping[str, Any]]) -> tuple[StorageFacts, ...]:
    """Storages from ``/cluster/resources?type=storage`` (one entry per node) (pure)."""
    by_name: dict[str, dict[str, Any]] = {}
    for r in resources:
        if r.get("type") != "storage":
            continue
        entry = by_name.setdefault(str(r["storage"]), {
            "type": str(r.get("plugintype", "")), "content": set(), "nodes": set(),
            "shared": bool(_int(r.get("shared", 0)))})
        entry["content"].update(c for c in str(r.get("content", "")).split(",") if c)
        entry["nodes"].add(str(r.get("node", "")))
    return tuple(StorageFacts(name, e["type"], tuple(sorted(e["content"])),
                              tuple(sorted(e["nodes"])), e["shared"])
                 for name, e in sorted(by_name.items()))


DATABASES_SQL = ("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                 "AND datname <> 'postgres' AND datname NOT LIKE 'labkeeper\\_drill\\_%' "
                 "ORDER BY 1;")


def read_databases(server: PgServer) -> list[str]:
    """The server's databases (not templates, not ``postgres``, not drill scratch ones)."""
    from labkeeper import postgres
    from labkeeper.secrets import resolve

    password = resolve(server.password) if server.password else None
    conn = postgres.Conn(server.host, server.port, "postgres", server.user, password=password)
    return [row[0] for row in postgres.query(conn, DATABASES_SQL) if row]
