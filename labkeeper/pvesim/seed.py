"""Python-side helpers for tests and the demo: seed guests and backups, read guest state."""

from __future__ import annotations

import copy
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.routes.volumes import (
    alloc_volume,
    next_disk_name,
    size_text,
    storage_volumes,
)
from labkeeper.pvesim.state import BACKUP_EXT, GiB, new_guest

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def set_rootfs_dir(sim: Simulator, vmid: int, path: Path | str) -> None:
    guest = sim.state["guests"].get(str(vmid))
    if guest is None or guest["type"] != "lxc":
        raise KeyError(f"no container {vmid}")
    Path(path).mkdir(parents=True, exist_ok=True)
    with sim.lock:
        guest["rootfs_dir"] = str(path)


def add_guest(
    sim: Simulator,
    vmid: int,
    gtype: str = "lxc",
    node: str | None = None,
    config: dict[str, Any] | None = None,
    status: str = "stopped",
    disk_storage: str = "local-lvm",
    disk_size: int = 8 * GiB,
) -> dict[str, Any]:
    node = node or sim.state["nodes"][0]
    if str(vmid) in sim.state["guests"]:
        raise ValueError(f"guest {vmid} exists")
    cfg = dict(config or {})
    with sim.lock:
        volname = next_disk_name(sim, node, disk_storage, vmid)
        volid = alloc_volume(sim, node, disk_storage, volname, disk_size, vmid,
                       "rootdir" if gtype == "lxc" else "images")
        if gtype == "lxc":
            cfg.setdefault("hostname", f"ct{vmid}")
            cfg.setdefault("rootfs", f"{volid},size={size_text(disk_size)}")
            cfg.setdefault("arch", "amd64")
            cfg.setdefault("ostype", "debian")
            cfg.setdefault("memory", 512)
        else:
            cfg.setdefault("name", f"vm{vmid}")
            cfg.setdefault("scsi0", f"{volid},size={size_text(disk_size)}")
            cfg.setdefault("memory", "2048")
        guest = new_guest(vmid, gtype, node, cfg)
        if status == "running":
            guest["status"] = "running"
            guest["started_at"] = time.time()
        sim.state["guests"][str(vmid)] = guest
    return guest


def add_backup(
    sim: Simulator,
    vmid: int,
    ctime: int,
    *,
    storage: str = "local",
    node: str | None = None,
    gtype: str = "lxc",
    protected: bool = False,
    notes: str = "",
    size: int = 1024**2,
) -> str:
    node = node or sim.state["nodes"][0]
    stamp = datetime.fromtimestamp(ctime).strftime("%Y_%m_%d-%H_%M_%S")
    ext = BACKUP_EXT[gtype]
    volid = f"{storage}:backup/vzdump-{gtype}-{vmid}-{stamp}.{ext}"
    with sim.lock:
        storage_volumes(sim, node, storage)[volid] = {
            "volid": volid, "content": "backup", "format": ext, "size": size, "ctime": ctime,
            "vmid": vmid, "subtype": gtype, "notes": notes, "protected": int(protected),
            "config": {},
        }
    return volid


def guest_state(sim: Simulator, vmid: int) -> dict[str, Any] | None:
    with sim.lock:
        guest = sim.state["guests"].get(str(vmid))
        return copy.deepcopy(guest) if guest else None
