"""Storage volumes as the routes see them: sizes, volume IDs, guest disks, allocation, paths."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.state import GiB
from labkeeper.pvesim.tasks import TaskRun

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def size_to_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", str(text))
    if not match:
        return 0
    mult = {"": GiB, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}[match.group(2)]
    return int(float(match.group(1)) * mult)


def size_text(size: int) -> str:
    if size % GiB == 0:
        return f"{size // GiB}G"
    return f"{size // 1024**2}M"


def split_volid(volid: str) -> tuple[str, str]:
    storage, sep, volname = volid.partition(":")
    if not sep:
        raise ApiError(500, f"unable to parse volume ID '{volid}'")
    return storage, volname


def storage_config(sim: Simulator, storage: str) -> dict[str, Any]:
    cfg = sim.state["storages"].get(storage)
    if cfg is None:
        raise ApiError(500, f"storage '{storage}' does not exist")
    return cfg


def storage_volumes(sim: Simulator, node: str, storage: str) -> dict[str, dict[str, Any]]:
    storage_config(sim, storage)
    return sim.state["volumes"].setdefault(node, {}).setdefault(storage, {})


def storage_used(sim: Simulator, node: str, storage: str) -> int:
    return sum(int(v.get("size", 0)) for v in storage_volumes(sim, node, storage).values())


def has_content(cfg: dict[str, Any], content: str) -> bool:
    return content in cfg["content"].split(",")


DISK_KEY = re.compile(r"^(rootfs|mp\d+|scsi\d+|virtio\d+|sata\d+|ide\d+|efidisk0|tpmstate0)$")


def disk_volids(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if DISK_KEY.match(key) or re.fullmatch(r"unused\d+", key):
            first = str(value).split(",")[0]
            if first.startswith("volume="):
                first = first[len("volume="):]
            if (":" in first and "media=cdrom" not in str(value)) or "cloudinit" in first:
                out[key] = first
    return out


def next_disk_name(sim: Simulator, node: str, storage: str, vmid: int) -> str:
    vols = storage_volumes(sim, node, storage)
    n = 0
    while f"{storage}:vm-{vmid}-disk-{n}" in vols:
        n += 1
    return f"vm-{vmid}-disk-{n}"


def alloc_volume(
    sim: Simulator, node: str, storage: str, volname: str, size: int, vmid: int, content: str
) -> str:
    volid = f"{storage}:{volname}"
    storage_volumes(sim, node, storage)[volid] = {
        "volid": volid,
        "content": content,
        "format": "raw",
        "size": size,
        "vmid": vmid,
        "ctime": int(time.time()),
    }
    return volid


def free_guest_volumes(sim: Simulator, guest: dict[str, Any], run: TaskRun | None) -> None:
    node = guest["node"]
    for storage_vols in sim.state["volumes"].get(node, {}).values():
        for volid in [v for v, e in storage_vols.items()
                      if e.get("vmid") == guest["vmid"] and e["content"] in ("images", "rootdir")]:
            del storage_vols[volid]
            if run is not None:
                volname = volid.split(":", 1)[1].split("/")[-1]
                run.log(f'  Logical volume "{volname}" successfully removed.')


def snapshot_capable(sim: Simulator, config: dict[str, Any]) -> bool:
    for volid in disk_volids(config).values():
        storage = volid.split(":", 1)[0]
        cfg = sim.state["storages"].get(storage)
        if cfg is None or not cfg.get("snapshots"):
            return False
    return True


def sim_dir(sim: Simulator, *parts: str) -> Path:
    path = sim.data_dir.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def replace_dir_contents(target: Path, source: Path | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if source is not None and source.exists():
        shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)


def find_volume(sim: Simulator, node: str, volid: str) -> dict[str, Any] | None:
    storage, _ = split_volid(volid)
    if storage not in sim.state["storages"]:
        raise ApiError(500, f"storage '{storage}' does not exist")
    return storage_volumes(sim, node, storage).get(volid)


def archive_file(sim: Simulator, node: str, volid: str) -> Path:
    storage, volname = split_volid(volid)
    return sim.data_dir / "storage" / node / storage / volname


def volume_path(sim: Simulator, volid: str, node: str | None = None) -> str:
    storage, volname = split_volid(volid)
    cfg = sim.state["storages"][storage]
    if node is not None and sim.host_paths and volname.startswith("backup/"):
        # Where the archive really is on this machine (an SSH/SFTP stand-in for the
        # node, e.g. the local lab's sshd, can then read it at the path PVE reports).
        return str(archive_file(sim, node, volid))
    if cfg["type"] == "dir":
        base = cfg.get("path", f"/mnt/pve/{storage}")
        if volname.startswith("vztmpl/"):
            return f"{base}/template/cache/{volname[7:]}"
        if volname.startswith("backup/"):
            return f"{base}/dump/{volname[7:]}"
        if volname.startswith("iso/"):
            return f"{base}/template/iso/{volname[4:]}"
        return f"{base}/{volname}"
    return f"/dev/pve/{volname.split('/')[-1]}"
