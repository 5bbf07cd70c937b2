"""A restored copy of a guest must not reach production (pure).

Drills and restores run copies next to the original: these functions name the
config keys that would share the host's files or hardware with it, and pull every
NIC's cable so the copy never answers on production's network.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PASSTHROUGH_KEY = re.compile(r"(hostpci|dev|parallel)\d+")
"""QEMU PCI passthrough, LXC device passthrough, host parallel ports: always the host's."""
_HOST_PATH_KEY = re.compile(r"(mp|scsi|sata|ide|virtio|serial)\d+")
"""Keys whose value may name a host path: LXC bind/device mount points, QEMU disks passed
through by path (``/dev/disk/by-id/...``), serial ports on a host device."""
_USB_KEY = re.compile(r"usb\d+")
_NIC_KEY = re.compile(r"net\d+")


def _first_value(value: Any) -> str:
    first = str(value).split(",", 1)[0]
    for prefix in ("volume=", "file=", "host=", "path="):
        if first.startswith(prefix):
            return first[len(prefix):]
    return first


def host_bound_keys(config: Mapping[str, Any]) -> list[str]:
    """Config keys of a guest *copy* that would reach the host's own files or hardware
    shared with the original: LXC bind and device mount points (``mpN`` with a host
    path), device passthrough (``devN``, ``hostpciN``, host ``usbN``), disks, serial and
    parallel ports given by host path. Deleted from restored copies and drill guests."""
    out: list[str] = []
    for key, value in sorted(config.items()):
        first = _first_value(value)
        if _PASSTHROUGH_KEY.fullmatch(key):
            out.append(key)
        elif _USB_KEY.fullmatch(key) and first != "spice":
            out.append(key)
        elif _HOST_PATH_KEY.fullmatch(key) and first.startswith("/"):
            out.append(key)
    return out


def unplugged_nics(config: Mapping[str, Any]) -> dict[str, str]:
    """Every NIC of a guest copy with ``link_down=1``: its settings (MAC, bridge, address)
    kept for a person to review, its cable pulled, so an address, cron jobs or mailers
    of the original never run twice on production's network."""
    out: dict[str, str] = {}
    for key, value in sorted(config.items()):
        if _NIC_KEY.fullmatch(key):
            parts = [p for p in str(value).split(",") if p and not p.startswith("link_down=")]
            out[key] = ",".join([*parts, "link_down=1"])
    return out
