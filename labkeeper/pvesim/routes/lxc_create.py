"""``POST /nodes/{node}/lxc``: create a container from a template or restore one from a backup."""

from __future__ import annotations

import hashlib
import re
import secrets
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.perms import Principal, require
from labkeeper.pvesim.routes.common import (
    check_node,
    check_replaceable,
    discard_callback,
    finish_create,
    register_guest,
    require_allocate,
)
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import (
    DISK_KEY,
    alloc_volume,
    archive_file,
    find_volume,
    has_content,
    next_disk_name,
    replace_dir_contents,
    sim_dir,
    size_text,
    size_to_bytes,
    storage_config,
    volume_path,
)
from labkeeper.pvesim.state import GiB
from labkeeper.pvesim.tasks import TaskFailed, TaskRun

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator

# Parameters PVE takes at creation that do not end up in the container's config.
_NOT_KEPT = ("password", "ssh-public-keys", "unique", "ignore-unpack-errors", "bwlimit",
             "ha-managed")


@route("POST", "/nodes/{node}/lxc")
def lxc_create(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    node, vmid = p.pop("node"), int(p.pop("vmid"))
    check_node(sim, node)
    restore = bool(p.pop("restore", 0))
    force = bool(p.pop("force", 0))
    start = bool(p.pop("start", 0))
    pool = p.pop("pool", None)
    storage_default = p.pop("storage", "local")
    ostemplate = p.pop("ostemplate")
    for key in _NOT_KEPT:
        p.pop(key, None)
    who = ctx.principal
    require_allocate(who, pool, vmid)
    existing = sim.state["guests"].get(str(vmid))
    check_replaceable(sim, existing, vmid, "lxc", node, restore and force)
    volume = _source_volume(sim, node, ostemplate, restore)
    rootfs_spec = _rootfs_spec(p.pop("rootfs", None), volume, restore, storage_default,
                               "storage" in ctx.p)
    rootfs = _Rootfs(*_parse_rootfs(rootfs_spec))
    scfg = rootfs.check(sim, who)
    config = _initial_config(volume, restore, ostemplate, vmid)
    config.update(p)
    config["lock"] = "create"
    guest = register_guest(sim, vmid, "lxc", node, config, existing, pool)
    plan = _LxcCreate(sim, guest, ostemplate, volume, restore, start, rootfs, scfg)
    return sim.tasks.start(node, "vzrestore" if restore else "vzcreate", vmid, ctx.user,
                           plan.run, vmid=vmid, on_error=discard_callback(sim, guest))


def _source_volume(sim: Simulator, node: str, ostemplate: str, restore: bool) -> dict[str, Any]:
    volume = find_volume(sim, node, ostemplate)
    if volume is None:
        raise ApiError(500, f"volume '{ostemplate}' does not exist")
    if restore and volume["content"] != "backup":
        raise ApiError(500, f"volume '{ostemplate}' is not a backup archive")
    if not restore and volume["content"] != "vztmpl":
        raise ApiError(500, f"volume '{ostemplate}' is not a container template")
    return volume


def _rootfs_spec(
    given: str | None, volume: dict[str, Any], restore: bool, storage_default: str,
    storage_given: bool,
) -> str:
    """The rootfs to allocate: as given, else the backup's size on the chosen storage."""
    spec = given
    if spec is None and restore:
        spec = volume.get("config", {}).get("rootfs")
        if spec:
            rs, size, _ = _parse_rootfs(spec)
            spec = f"{storage_default if storage_given else rs}:{size // GiB or 1}"
    return spec or f"{storage_default}:4"


def _parse_rootfs(value: str) -> tuple[str, int, str]:
    """rootfs: ``local-lvm:8`` or ``volume=local-lvm:8,size=8G`` -> (storage, bytes, rest)."""
    parts = value.split(",")
    first = parts[0][len("volume="):] if parts[0].startswith("volume=") else parts[0]
    storage, _, amount = first.partition(":")
    rest = ",".join(p for p in parts[1:] if not p.startswith("size="))
    size = size_to_bytes(amount) if re.fullmatch(r"\d+(?:\.\d+)?", amount) else 0
    for part in parts[1:]:
        if part.startswith("size="):
            size = size_to_bytes(part[5:])
    return storage, size or 4 * GiB, rest


def _initial_config(
    volume: dict[str, Any], restore: bool, ostemplate: str, vmid: int
) -> dict[str, Any]:
    if not restore:
        return {"arch": "amd64", "ostype": _template_ostype(ostemplate), "memory": 512,
                "swap": 512, "cores": 1, "hostname": f"CT{vmid}"}
    # PVE re-allocates volume mount points but keeps bind and device mount points
    # (a host path) as they were: restoring them needs root, which the lab's token has
    return {k: v for k, v in volume.get("config", {}).items()
            if (not DISK_KEY.match(k) or _host_path_mount(k, v))
            and not k.startswith("unused") and k != "lock"}


def _template_ostype(name: str) -> str:
    for os_name in ("debian", "ubuntu", "alpine", "centos", "fedora", "archlinux", "rocky"):
        if os_name in name:
            return os_name
    return "unmanaged"


def _host_path_mount(key: str, value: Any) -> bool:
    """An LXC ``mpN`` whose volume is a host path (bind or device mount point)."""
    first = str(value).split(",", 1)[0].removeprefix("volume=")
    return key.startswith("mp") and first.startswith("/")


@dataclass
class _Rootfs:
    storage: str
    size: int
    rest: str

    def check(self, sim: Simulator, who: Principal) -> dict[str, Any]:
        """The storage's config, once it is known to take containers and the caller may
        allocate on it."""
        scfg = storage_config(sim, self.storage)
        if not has_content(scfg, "rootdir"):
            raise ApiError(500, f"storage '{self.storage}' does not support container "
                           "directories")
        require(who, f"/storage/{self.storage}", "Datastore.AllocateSpace")
        return scfg


@dataclass
class _LxcCreate:
    """The create/restore task: allocate the rootfs, unpack, log as ``pct`` does."""

    sim: Simulator
    guest: dict[str, Any]
    ostemplate: str
    volume: dict[str, Any]
    restore: bool
    start: bool
    rootfs: _Rootfs
    scfg: dict[str, Any]

    def run(self, run: TaskRun) -> None:
        path = volume_path(self.sim, self.ostemplate)
        if self.restore:
            run.log(f"recovering backed-up configuration from '{self.ostemplate}'")
        self._allocate(run)
        run.sleep(0.5)
        message = run.injected_failure()
        if message is not None:
            raise TaskFailed(f"unable to {'restore' if self.restore else 'create'} CT "
                             f"{self.guest['vmid']} - {message}")
        self._extract(run, path)
        finish_create(self.sim, self.guest, self.start)

    def _allocate(self, run: TaskRun) -> None:
        sim, guest, rootfs = self.sim, self.guest, self.rootfs
        node, vmid = guest["node"], guest["vmid"]
        with sim.lock:
            volname = next_disk_name(sim, node, rootfs.storage, vmid)
            volid = alloc_volume(sim, node, rootfs.storage, volname, rootfs.size, vmid,
                                 "rootdir")
            guest["config"]["rootfs"] = f"{volid},size={size_text(rootfs.size)}" + (
                f",{rootfs.rest}" if rootfs.rest else "")
        if self.scfg["type"] == "lvmthin":
            run.log(f'  Logical volume "{volname}" created.')
        blocks = rootfs.size // 4096
        run.log(f"Creating filesystem with {blocks} 4k blocks and {blocks // 4} inodes")

    def _extract(self, run: TaskRun, path: str) -> None:
        guest = self.guest
        if self.restore:
            run.log(f"restoring '{self.ostemplate}' now..")
        run.log(f"extracting archive '{path}'")
        size = int(self.volume.get("size", 0))
        if self.restore:
            _restore_rootfs(self.sim, guest, self.volume)
        run.sleep(0.5)
        mib = max(size // 1024**2, 1)
        run.log(f"Total bytes read: {size} ({mib}MiB, {mib}MiB/s)")
        run.log(f"Detected container architecture: {guest['config'].get('arch', 'amd64')}")
        if self.restore:
            run.log("merging backed-up and given configuration..")
            return
        for keytype in ("rsa", "ecdsa", "ed25519"):
            run.log(f"Creating SSH host key 'ssh_host_{keytype}_key' - this may take some "
                    "time ...")
            fp = hashlib.sha256(f"{guest['vmid']}{keytype}".encode()).hexdigest()[:43]
            run.log(f"done: SHA256:{fp} root@{guest['config'].get('hostname')}")


def _restore_rootfs(sim: Simulator, guest: dict[str, Any], volume: dict[str, Any]) -> None:
    archive = archive_file(sim, guest["node"], volume["volid"])
    if not archive.exists():
        return
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("rootfs/") or
                   m.name == "rootfs"]
        has_rootfs = any(m.name == "rootfs" or m.name.startswith("rootfs/") for m in members)
        if not has_rootfs:
            return
        target = Path(guest.get("rootfs_dir") or sim_dir(sim, "rootfs", str(guest["vmid"])))
        staging = sim.data_dir / "tmp" / f"restore-{guest['vmid']}-{secrets.token_hex(4)}"
        staging.mkdir(parents=True)
        try:
            tar.extractall(staging, members=members, filter="data")
            replace_dir_contents(target, staging / "rootfs")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        guest["rootfs_dir"] = str(target)
