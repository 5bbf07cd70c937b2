"""``POST /nodes/{node}/qemu``: create a VM, or restore one from a vzdump archive."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
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
    find_volume,
    has_content,
    next_disk_name,
    size_text,
    size_to_bytes,
    storage_config,
    volume_path,
)
from labkeeper.pvesim.state import GiB
from labkeeper.pvesim.tasks import TaskFailed, TaskRun

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator

# Parameters PVE takes at creation that do not end up in the VM's config.
_NOT_KEPT = ("unique", "bwlimit", "live-restore", "ha-managed", "import-working-storage")


@dataclass
class _Disk:
    """A disk to allocate: config key, storage, size in bytes, options after the volume."""

    key: str
    storage: str
    size: int
    extra: str


@route("POST", "/nodes/{node}/qemu")
def qemu_create(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    node, vmid = p.pop("node"), int(p.pop("vmid"))
    check_node(sim, node)
    archive = p.pop("archive", None)
    force = bool(p.pop("force", 0))
    start = bool(p.pop("start", 0))
    pool = p.pop("pool", None)
    target_storage = p.pop("storage", None)
    for key in _NOT_KEPT:
        p.pop(key, None)
    who = ctx.principal
    require_allocate(who, pool, vmid)
    existing = sim.state["guests"].get(str(vmid))
    check_replaceable(sim, existing, vmid, "qemu", node, bool(archive and force))
    volume = None
    if archive:
        volume = find_volume(sim, node, archive)
        if volume is None or volume["content"] != "backup":
            raise ApiError(500, f"volume '{archive}' does not exist")
    config: dict[str, Any] = {}
    if volume is not None:
        config.update({k: v for k, v in volume.get("config", {}).items() if k != "lock"})
    config.update(p)
    config["lock"] = "create"
    disks = _disks_to_allocate(sim, who, config, volume is not None, target_storage)
    guest = register_guest(sim, vmid, "qemu", node, config, existing, pool)
    plan = _QemuCreate(sim, guest, archive or "", volume, disks, start)
    return sim.tasks.start(node, "qmrestore" if archive else "qmcreate", vmid, ctx.user,
                           plan.run, vmid=vmid, on_error=discard_callback(sim, guest))


def _disks_to_allocate(
    sim: Simulator, who: Principal, config: dict[str, Any], restoring: bool,
    target_storage: str | None,
) -> list[_Disk]:
    """New disks the config asks for (``local-lvm:32``), or every disk of a restored VM."""
    disks = []
    for key, value in config.items():
        if not DISK_KEY.match(key) or key == "rootfs" or "media=cdrom" in str(value):
            continue
        first, *rest = str(value).split(",")
        storage, _, amount = first.partition(":")
        if restoring:
            storage = target_storage or storage
            match = re.search(r"size=(\d+(?:\.\d+)?[KMGT]?)", str(value))
            size = size_to_bytes(match.group(1)) if match else 4 * GiB
        elif re.fullmatch(r"\d+(?:\.\d+)?", amount):
            size = size_to_bytes(amount)
        else:
            continue  # an existing volume is referenced
        if not has_content(storage_config(sim, storage), "images"):
            raise ApiError(500, f"storage '{storage}' does not support vm images")
        require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
        extra = ",".join(r for r in rest if not r.startswith("size="))
        disks.append(_Disk(key, storage, size, extra))
    return disks


@dataclass
class _QemuCreate:
    """The create/restore task: allocate the disks, log as ``qmrestore`` does."""

    sim: Simulator
    guest: dict[str, Any]
    archive: str
    volume: dict[str, Any] | None
    disks: list[_Disk]
    start: bool

    def run(self, run: TaskRun) -> None:
        if self.volume is not None:
            self._log_restore_start(run, self.volume)
        for disk in self.disks:
            self._allocate(run, disk)
        run.sleep()
        message = run.injected_failure()
        if message is not None:
            raise TaskFailed(f"unable to {'restore' if self.volume else 'create'} VM "
                             f"{self.guest['vmid']} - {message}")
        if self.volume is not None:
            total = sum(d.size for d in self.disks)
            run.log(f"progress 100% (read {total} bytes, duration 0 sec)")
            run.log(f"total bytes read {total}, sparse bytes 0 (0%)")
            run.log("space reduction due to 4K zero blocks 0.00%")
            run.log("rescan volumes...")
        finish_create(self.sim, self.guest, self.start)

    def _log_restore_start(self, run: TaskRun, volume: dict[str, Any]) -> None:
        path = volume_path(self.sim, self.archive)
        tmpdir = f"/var/tmp/vzdumptmp{run.record['pid']}"  # noqa: S108 - log text only
        run.log(f"restore vma archive: zstd -q -d -c {path} | vma extract -v -r "
                f"{tmpdir}.fifo - {tmpdir}")
        run.log("CFG: size: 496 name: qemu-server.conf")
        for i, disk in enumerate(self.disks, start=1):
            run.log(f"DEV: dev_id={i} size: {disk.size} devname: drive-{disk.key}")
        ctime = datetime.fromtimestamp(volume["ctime"])
        run.log(f"CTIME: {ctime.strftime('%a %b %d %H:%M:%S %Y')}")

    def _allocate(self, run: TaskRun, disk: _Disk) -> None:
        sim, guest = self.sim, self.guest
        node, vmid = guest["node"], guest["vmid"]
        with sim.lock:
            volname = next_disk_name(sim, node, disk.storage, vmid)
            volid = alloc_volume(sim, node, disk.storage, volname, disk.size, vmid, "images")
            guest["config"][disk.key] = f"{volid}" + (f",{disk.extra}" if disk.extra else "") + \
                f",size={size_text(disk.size)}"
        if sim.state["storages"][disk.storage]["type"] == "lvmthin":
            run.log(f'  Logical volume "{volname}" created.')
        if self.volume is not None:
            run.log(f"new volume ID is '{volid}'")
            run.log(f"map 'drive-{disk.key}' to '/dev/pve/{volname}' (write zeros = 0)")
