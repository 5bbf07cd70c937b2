"""The PVE config labkeeper wants for an inventory guest, and how PVE's values compare.

Pure. :func:`desired_config` renders the options labkeeper manages (resources, NICs,
tags, features, cloud-init); :func:`same_value` says whether PVE's value already is
the wanted one, knowing PVE's defaults and property-string forms; :func:`merged_net`
keeps PVE's MAC when the inventory names none; disks are read as (storage, bytes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote

from labkeeper.inventory import Guest, Nic

SEND_DESCRIPTION = True
"""Send the inventory's ``description`` to PVE (a switch for PVE structure files that
lack every ``description`` parameter, as one this project validated against once did)."""

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


def flag(value: bool) -> str:
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
                           "onboot": flag(guest.onboot),
                           "tags": desired_tags(guest, managed_tag)}
    if guest.startup_order is not None:
        cfg["startup"] = f"order={guest.startup_order}"
    if with_description and guest.description:
        cfg["description"] = guest.description
    cfg.update(_lxc_options(guest) if guest.type == "lxc" else _qemu_options(guest))
    return cfg


def _lxc_options(guest: Guest) -> dict[str, str]:
    cfg = {"hostname": guest.name, "swap": str(guest.resources.swap_mb)}
    for i, nic in enumerate(guest.network):
        cfg[f"net{i}"] = format_props(lxc_net(nic))
    if guest.features is not None:
        f = guest.features
        feats = {"nesting": flag(f.nesting), "keyctl": flag(f.keyctl), "fuse": flag(f.fuse)}
        feats = {k: v for k, v in feats.items() if v == "1"}
        if f.mount:
            feats["mount"] = ";".join(f.mount)
        if feats:
            cfg["features"] = format_props(feats)
    return cfg


def _qemu_options(guest: Guest) -> dict[str, str]:
    r = guest.resources
    cfg = {"name": guest.name, "sockets": str(r.sockets)}
    if r.balloon_mb is not None:
        cfg["balloon"] = str(r.balloon_mb)
    for i, nic in enumerate(guest.network):
        cfg[f"net{i}"] = format_props(qemu_net(nic))
    if guest.cloud_init is not None:
        cfg.update(_cloud_init_options(guest))
    return cfg


def _cloud_init_options(guest: Guest) -> dict[str, str]:
    ci = guest.cloud_init
    assert ci is not None
    cfg: dict[str, str] = {}
    if ci.user:
        cfg["ciuser"] = ci.user
    if ci.ssh_keys:
        cfg["sshkeys"] = quote("\n".join(ci.ssh_keys), safe="")
    if ci.nameservers:
        cfg["nameserver"] = " ".join(ci.nameservers)
    if ci.searchdomain:
        cfg["searchdomain"] = ci.searchdomain
    cfg["ciupgrade"] = flag(ci.upgrade)
    ipconfigs = ci.ipconfig if ci.ipconfig is not None else [
        ipconfig_of(n) for n in guest.network]
    for i, value in enumerate(ipconfigs):
        if value:
            cfg[f"ipconfig{i}"] = value
    return cfg


def normalise(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return flag(value)
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
    a = normalise(actual)
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
    have = parse_props(normalise(actual))
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
    props = parse_props(normalise(value))
    first = next(iter(props), "")
    volid = props.get("volume") or first
    storage = volid.split(":", 1)[0]
    return storage, size_bytes(props["size"]) if props.get("size") else 0


def gib_text(n: int) -> str:
    return f"{n / GiB:g}G"
