"""``.../snapshot``: create, list, roll back and delete guest snapshots."""

from __future__ import annotations

import copy
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.routes.common import (
    check_lock,
    config_out,
    find_guest,
    set_lock,
    unlock_callback,
)
from labkeeper.pvesim.routes.registry import ROUTES, Ctx
from labkeeper.pvesim.routes.volumes import disk_volids, replace_dir_contents, snapshot_capable
from labkeeper.pvesim.tasks import TaskRun


def _snap_list(ctx: Ctx, gtype: str) -> Any:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    out = []
    for name, snap in guest["snapshots"].items():
        entry = {"name": name, "snaptime": snap["snaptime"],
                 "description": snap.get("description", "")}
        if snap.get("parent"):
            entry["parent"] = snap["parent"]
        if gtype == "qemu":
            entry["vmstate"] = 0
        out.append(entry)
    current: dict[str, Any] = {"name": "current", "description": "You are here!",
                               "running": 1 if guest["status"] == "running" else 0}
    if guest.get("parent"):
        current["parent"] = guest["parent"]
    out.append(current)
    return out


def _snap_create(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = find_guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    name = ctx.p["snapname"]
    vmid = guest["vmid"]
    check_lock(guest)
    if name == "current":
        raise ApiError(500, "invalid snapshot name 'current'")
    if name in guest["snapshots"]:
        raise ApiError(500, f"snapshot name '{name}' already used")
    if not snapshot_capable(sim, guest["config"]):
        raise ApiError(500, "snapshot feature is not available")
    set_lock(sim, guest, "snapshot")
    description = ctx.p.get("description", "")

    def work(run: TaskRun) -> None:
        if gtype == "lxc":
            run.log("()")
        for volid in disk_volids(guest["config"]).values():
            volname = volid.split(":", 1)[1].split("/")[-1]
            if "cloudinit" not in volname:
                run.log(f'  Logical volume "snap_{volname}_{name}" created.')
        run.sleep()
        run.check_injected()
        rootfs = guest.get("rootfs_dir")
        if rootfs and Path(rootfs).exists():
            target = sim.data_dir / "snapshots" / str(vmid) / name
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(rootfs, target, symlinks=True)
        with sim.lock:
            cfg = {k: v for k, v in guest["config"].items() if k != "lock"}
            guest["snapshots"][name] = {"snaptime": int(time.time()), "config": cfg,
                                        "parent": guest.get("parent"),
                                        "description": description}
            guest["parent"] = name
            guest["config"].pop("lock", None)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}snapshot", vmid, ctx.user, work, vmid=vmid,
                           on_error=unlock_callback(sim, guest))


def _snap_get(ctx: Ctx, gtype: str) -> Any:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    if ctx.p["snapname"] not in guest["snapshots"]:
        raise ApiError(500, f"snapshot '{ctx.p['snapname']}' does not exist")
    return [{"subdir": "rollback"}, {"subdir": "config"}]


def _snap_config(ctx: Ctx, gtype: str) -> Any:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    return config_out(guest, ctx.p["snapname"])


def _snap_rollback(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = find_guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    name, vmid = ctx.p["snapname"], guest["vmid"]
    check_lock(guest)
    if name not in guest["snapshots"]:
        raise ApiError(500, f"snapshot '{name}' does not exist")
    start_after = bool(ctx.p.get("start"))
    set_lock(sim, guest, "rollback")

    def work(run: TaskRun) -> None:
        if guest["status"] == "running":
            with sim.lock:
                guest["status"] = "stopped"
                guest["started_at"] = None
        run.sleep()
        run.check_injected()
        snap_copy = sim.data_dir / "snapshots" / str(vmid) / name
        rootfs = guest.get("rootfs_dir")
        if rootfs and snap_copy.exists():
            replace_dir_contents(Path(rootfs), snap_copy)
        with sim.lock:
            guest["config"] = copy.deepcopy(guest["snapshots"][name]["config"])
            guest["parent"] = name
            if start_after:
                guest["status"] = "running"
                guest["started_at"] = time.time()

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}rollback", vmid, ctx.user, work, vmid=vmid,
                           on_error=unlock_callback(sim, guest))


def _snap_delete(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = find_guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    name, vmid = ctx.p["snapname"], guest["vmid"]
    if not ctx.p.get("force"):
        check_lock(guest)
    if name not in guest["snapshots"]:
        raise ApiError(500, f"snapshot '{name}' does not exist")
    set_lock(sim, guest, "snapshot-delete")

    def work(run: TaskRun) -> None:
        for volid in disk_volids(guest["snapshots"][name]["config"]).values():
            volname = volid.split(":", 1)[1].split("/")[-1]
            if "cloudinit" not in volname:
                run.log(f'  Logical volume "snap_{volname}_{name}" successfully removed.')
        run.sleep()
        run.check_injected()
        with sim.lock:
            snap = guest["snapshots"].pop(name)
            for other in guest["snapshots"].values():
                if other.get("parent") == name:
                    other["parent"] = snap.get("parent")
            if guest.get("parent") == name:
                guest["parent"] = snap.get("parent")
            guest["config"].pop("lock", None)
        shutil.rmtree(sim.data_dir / "snapshots" / str(vmid) / name, ignore_errors=True)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}delsnapshot", vmid, ctx.user, work,
                           vmid=vmid, on_error=unlock_callback(sim, guest))


for _gtype in ("lxc", "qemu"):
    _base = f"/nodes/{{node}}/{_gtype}/{{vmid}}/snapshot"
    ROUTES[("GET", _base)] = partial(_snap_list, gtype=_gtype)
    ROUTES[("POST", _base)] = partial(_snap_create, gtype=_gtype)
    ROUTES[("GET", _base + "/{snapname}")] = partial(_snap_get, gtype=_gtype)
    ROUTES[("DELETE", _base + "/{snapname}")] = partial(_snap_delete, gtype=_gtype)
    ROUTES[("GET", _base + "/{snapname}/config")] = partial(_snap_config, gtype=_gtype)
    ROUTES[("POST", _base + "/{snapname}/rollback")] = partial(_snap_rollback, gtype=_gtype)
