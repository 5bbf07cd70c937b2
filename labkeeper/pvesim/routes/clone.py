"""``.../clone``: full and linked clones of containers and VMs."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.routes.common import (
    add_to_pool,
    check_lock,
    check_node,
    discard_callback,
    find_guest,
    guest_label,
    guest_name,
    random_mac,
)
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import (
    alloc_volume,
    disk_volids,
    next_disk_name,
    size_text,
    storage_volumes,
)
from labkeeper.pvesim.state import GiB, new_guest
from labkeeper.pvesim.tasks import TaskRun

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def _clone(ctx: Ctx, gtype: str) -> str:
    sim, p = ctx.sim, ctx.p
    source = find_guest(sim, p["node"], p["vmid"], gtype)
    newid = int(p["newid"])
    label = guest_label(gtype)
    if str(newid) in sim.state["guests"]:
        raise ApiError(500, f"unable to create {label} {newid}: config file already exists")
    full = _clone_mode(p, source)
    target = p.get("target") or source["node"]
    _check_target(sim, source, target, label)
    src_config = _source_config(source, p.get("snapname"))
    pool = p.get("pool")
    if pool and pool not in sim.state["pools"]:
        raise ApiError(500, f"pool '{pool}' does not exist")
    config = _clone_config(p, source, src_config, gtype)
    with sim.lock:
        if str(newid) in sim.state["guests"]:  # PVE creates the config under a cluster lock
            raise ApiError(500, f"unable to create {label} {newid}: config file already exists")
        guest = new_guest(newid, gtype, target, config)
        sim.state["guests"][str(newid)] = guest
        if pool:
            add_to_pool(sim, pool, newid)
    disks = {k: v for k, v in disk_volids(src_config).items() if not k.startswith("unused")}
    plan = _Clone(sim, source, guest, src_config, disks, target, full, p.get("storage"))
    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(source["node"], f"{prefix}clone", source["vmid"], ctx.user, plan.run,
                           vmid=source["vmid"], on_error=discard_callback(sim, guest))


def _clone_mode(p: dict[str, Any], source: dict[str, Any]) -> bool:
    """True for a full clone; templates default to linked ones, other guests need full."""
    is_template = bool(int(source["config"].get("template", 0)))
    if not is_template:
        check_lock(source)
    full = bool(p["full"]) if "full" in p else not is_template
    if not full and not is_template:
        raise ApiError(500, "clone_image only works on base images")
    if p.get("storage") and not full:
        raise ApiError(500, "parameter 'storage' not allowed for linked clones")
    return full


def _check_target(sim: Simulator, source: dict[str, Any], target: str, label: str) -> None:
    check_node(sim, target)
    if target == source["node"]:
        return
    for volid in disk_volids(source["config"]).values():
        storage = volid.split(":", 1)[0]
        if not sim.state["storages"][storage].get("shared"):
            raise ApiError(500, f"can't clone {label} to node '{target}' "
                           f"({label} uses local storage)")


def _source_config(source: dict[str, Any], snapname: str | None) -> dict[str, Any]:
    if not snapname:
        return source["config"]
    if snapname not in source["snapshots"]:
        raise ApiError(500, f"snapshot '{snapname}' does not exist")
    return source["snapshots"][snapname]["config"]


def _clone_config(
    p: dict[str, Any], source: dict[str, Any], src_config: dict[str, Any], gtype: str
) -> dict[str, Any]:
    """The new guest's config: a new name and MAC addresses, no template or unused disks."""
    config = {k: v for k, v in src_config.items() if k not in ("template", "lock", "parent")}
    name_key = "hostname" if gtype == "lxc" else "name"
    config[name_key] = p.get(name_key) or p.get("name") or (
        f"Copy-of-VM-{guest_name(source)}" if gtype == "qemu" else guest_name(source))
    for key in list(config):
        if re.fullmatch(r"net\d+", key):
            value = str(config[key])
            if gtype == "qemu":
                config[key] = re.sub(r"=([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})",
                                     f"={random_mac()}", value, count=1)
            else:
                config[key] = re.sub(r"hwaddr=[0-9A-Fa-f:]+", f"hwaddr={random_mac()}", value)
    config["lock"] = "clone"
    for key in [k for k in config if re.fullmatch(r"unused\d+", k)]:
        del config[key]
    return config


@dataclass
class _Clone:
    """The clone task: copy each disk (full) or base a new one on it (linked)."""

    sim: Simulator
    source: dict[str, Any]
    guest: dict[str, Any]
    src_config: dict[str, Any]
    disks: dict[str, str]
    target: str
    full: bool
    storage: str | None

    def run(self, run: TaskRun) -> None:
        sim, guest = self.sim, self.guest
        for key, volid in self.disks.items():
            self._clone_disk(run, key, volid)
        run.sleep()
        run.check_injected()
        src_dir = self.source.get("rootfs_dir")
        if guest["type"] == "lxc" and src_dir and Path(src_dir).exists():
            dest = sim.data_dir / "rootfs" / str(guest["vmid"])
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src_dir, dest, symlinks=True)
            guest["rootfs_dir"] = str(dest)
        with sim.lock:
            guest["config"].pop("lock", None)

    def _clone_disk(self, run: TaskRun, key: str, volid: str) -> None:
        sim, guest, target, newid = self.sim, self.guest, self.target, self.guest["vmid"]
        storage, volname = volid.split(":", 1)
        base = volname.split("/")[-1]
        if "cloudinit" in base:
            with sim.lock:
                new_volid = alloc_volume(sim, target, storage, f"vm-{newid}-cloudinit",
                                         4 * 1024**2, newid, "images")
                guest["config"][key] = f"{new_volid},media=cdrom"
            return
        src_vol = storage_volumes(sim, self.source["node"], storage).get(volid, {})
        size = int(src_vol.get("size", 4 * GiB))
        kind = "full" if self.full else "linked"
        run.log(f"create {kind} clone of drive {key} ({volid})")
        dest_storage = self.storage or storage
        with sim.lock:
            new_name = next_disk_name(sim, target, dest_storage, newid)
            if self.full:
                new_volid = alloc_volume(sim, target, dest_storage, new_name, size, newid,
                                         "images")
            else:
                new_volid = alloc_volume(sim, target, storage, f"{base}/{new_name}", size,
                                         newid, "images")
            rest = ",".join(part for part in str(self.src_config[key]).split(",")[1:]
                            if not part.startswith("size="))
            guest["config"][key] = new_volid + (f",{rest}" if rest else "") + \
                f",size={size_text(size)}"
        run.log(f'  Logical volume "{new_name}" created.')
        if self.full:
            human = f"{size / GiB:.1f} GiB"
            run.log(f"transferred {human} of {human} (100.00%)")


@route("POST", "/nodes/{node}/qemu/{vmid}/clone")
def qemu_clone(ctx: Ctx) -> Any:
    return _clone(ctx, "qemu")


@route("POST", "/nodes/{node}/lxc/{vmid}/clone")
def lxc_clone(ctx: Ctx) -> Any:
    return _clone(ctx, "lxc")
