"""LXC and QEMU guests: listing, status, configuration, resize and destroy."""

from __future__ import annotations

import re
import shutil
from typing import Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.routes.common import (
    check_lock,
    check_node,
    config_digest,
    config_out,
    find_guest,
    guest_entry,
    guest_label,
    remove_from_pools,
    set_lock,
    unlock_callback,
)
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import (
    disk_volids,
    free_guest_volumes,
    size_text,
    size_to_bytes,
    storage_volumes,
)
from labkeeper.pvesim.tasks import TaskRun


def _list_guests(ctx: Ctx, gtype: str) -> list[dict[str, Any]]:
    node = ctx.p["node"]
    check_node(ctx.sim, node)
    out = []
    for guest in sorted(ctx.sim.state["guests"].values(), key=lambda g: g["vmid"]):
        if guest["node"] == node and guest["type"] == gtype and ctx.principal.has(
            f"/vms/{guest['vmid']}", "VM.Audit"
        ):
            entry = guest_entry(ctx.sim, guest)
            if gtype == "qemu":
                entry.pop("type")
                entry.pop("maxswap", None)
            out.append(entry)
    return out


@route("GET", "/nodes/{node}/lxc")
def lxc_list(ctx: Ctx) -> Any:
    return _list_guests(ctx, "lxc")


@route("GET", "/nodes/{node}/qemu")
def qemu_list(ctx: Ctx) -> Any:
    return _list_guests(ctx, "qemu")


@route("GET", "/nodes/{node}/lxc/{vmid}", "/nodes/{node}/qemu/{vmid}")
def guest_index(ctx: Ctx) -> Any:
    gtype = "lxc" if ctx.sim.state["guests"].get(str(ctx.p["vmid"]), {}).get("type") == "lxc" \
        else "qemu"
    find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    return [{"subdir": s} for s in ("config", "status", "snapshot", "clone")]


def _status_current(ctx: Ctx, gtype: str) -> Any:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    entry = guest_entry(ctx.sim, guest)
    entry["ha"] = {"managed": 0}
    if gtype == "qemu":
        entry["qmpstatus"] = guest["status"]
        entry.pop("type")
        entry["agent"] = 1 if str(guest["config"].get("agent", "0")).startswith("1") else 0
    return entry


@route("GET", "/nodes/{node}/lxc/{vmid}/status/current")
def lxc_status(ctx: Ctx) -> Any:
    return _status_current(ctx, "lxc")


@route("GET", "/nodes/{node}/qemu/{vmid}/status/current")
def qemu_status(ctx: Ctx) -> Any:
    return _status_current(ctx, "qemu")


@route("GET", "/nodes/{node}/lxc/{vmid}/status", "/nodes/{node}/qemu/{vmid}/status")
def guest_status_index(ctx: Ctx) -> Any:
    return [{"subdir": s} for s in ("current", "start", "stop", "shutdown", "reboot")]


@route("GET", "/nodes/{node}/lxc/{vmid}/config")
def lxc_config(ctx: Ctx) -> Any:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], "lxc")
    return config_out(guest, ctx.p.get("snapshot"))


@route("GET", "/nodes/{node}/qemu/{vmid}/config")
def qemu_config(ctx: Ctx) -> Any:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], "qemu")
    return config_out(guest, ctx.p.get("snapshot"))


_NOT_CONFIG = {"node", "vmid", "delete", "digest", "revert", "skiplock", "force",
               "background_delay"}


def _apply_config(ctx: Ctx, gtype: str) -> dict[str, Any]:
    guest = find_guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    p = ctx.p
    if "lock" not in p:
        check_lock(guest, bool(p.get("skiplock")))
    if p.get("digest") and p["digest"] != config_digest(guest["config"]):
        raise ApiError(500, "detected modified configuration - file changed by other user? "
                              "Try again.")
    deletes = [d for d in re.split(r"[,;\s]+", p.get("delete", "")) if d]
    for key in deletes:
        if key in p:
            raise ApiError(400, "Parameter verification failed.",
                             {"delete": f"cannot set and delete '{key}' at the same time"})
    with ctx.sim.lock:
        for key in deletes:
            guest["config"].pop(key, None)
        for key, value in p.items():
            if key not in _NOT_CONFIG:
                guest["config"][key] = value
    return guest


@route("PUT", "/nodes/{node}/lxc/{vmid}/config")
def lxc_config_put(ctx: Ctx) -> Any:
    _apply_config(ctx, "lxc")
    return None


@route("PUT", "/nodes/{node}/qemu/{vmid}/config")
def qemu_config_put(ctx: Ctx) -> Any:
    _apply_config(ctx, "qemu")
    return None


@route("POST", "/nodes/{node}/qemu/{vmid}/config")
def qemu_config_post(ctx: Ctx) -> Any:
    guest = _apply_config(ctx, "qemu")

    def work(run: TaskRun) -> None:
        run.sleep(0.25)
        run.check_injected()

    return ctx.sim.tasks.start(guest["node"], "qmconfig", guest["vmid"], ctx.user, work,
                               vmid=guest["vmid"])


def _destroy(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = find_guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    vmid, label = guest["vmid"], guest_label(gtype)
    check_lock(guest)
    if guest["status"] == "running":
        if not (gtype == "lxc" and ctx.p.get("force")):
            raise ApiError(500, f"{label} {vmid} is running - destroy failed")
    if int(guest["config"].get("protection", 0)):
        raise ApiError(500, f"can't remove {label} {vmid} - protection mode enabled")
    purge = bool(ctx.p.get("purge"))
    set_lock(sim, guest, "destroyed")

    def work(run: TaskRun) -> None:
        run.sleep()
        run.check_injected()
        with sim.lock:
            free_guest_volumes(sim, guest, run)
            sim.state["guests"].pop(str(vmid), None)
            remove_from_pools(sim, vmid)
            if purge:
                for job in sim.state["backup_jobs"].values():
                    ids = [v for v in re.split(r"[,;\s]+", str(job.get("vmid", ""))) if v]
                    if str(vmid) in ids:
                        ids.remove(str(vmid))
                        job["vmid"] = ",".join(ids)
        rootfs = guest.get("rootfs_dir")
        if rootfs:
            shutil.rmtree(rootfs, ignore_errors=True)
        shutil.rmtree(sim.data_dir / "snapshots" / str(vmid), ignore_errors=True)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}destroy", vmid, ctx.user, work, vmid=vmid,
                           on_error=unlock_callback(sim, guest))


@route("DELETE", "/nodes/{node}/lxc/{vmid}")
def lxc_destroy(ctx: Ctx) -> Any:
    return _destroy(ctx, "lxc")


@route("DELETE", "/nodes/{node}/qemu/{vmid}")
def qemu_destroy(ctx: Ctx) -> Any:
    return _destroy(ctx, "qemu")


def _resize(ctx: Ctx, gtype: str) -> str:
    """``PUT .../resize``: grow a disk (``size`` absolute or ``+delta``); never shrink."""
    sim, p = ctx.sim, ctx.p
    guest = find_guest(sim, p["node"], p["vmid"], gtype)
    vmid, disk = guest["vmid"], str(p["disk"])
    check_lock(guest, bool(p.get("skiplock")))
    if p.get("digest") and p["digest"] != config_digest(guest["config"]):
        raise ApiError(500, "detected modified configuration - file changed by other user? "
                              "Try again.")
    value = guest["config"].get(disk)
    if value is None or disk not in disk_volids(guest["config"]):
        raise ApiError(500, f"unable to parse volume ID '{disk}'" if value is None
                         else f"disk '{disk}' is not a volume")
    volid = disk_volids(guest["config"])[disk]
    match = re.search(r"size=(\d+(?:\.\d+)?[KMGT]?)", str(value))
    current = size_to_bytes(match.group(1)) if match else 0
    text = str(p["size"])
    new = current + size_to_bytes(text[1:]) if text.startswith("+") else size_to_bytes(text)
    if new < current:
        raise ApiError(500, "shrinking disks is not supported")
    storage = volid.split(":", 1)[0]
    if sim.faults.is_full(storage, guest["node"]):
        raise ApiError(500, f"unable to resize '{volid}' - No space left on device")

    def work(run: TaskRun) -> None:
        run.log(f"  Size of logical volume {volid} changed from {size_text(current)} to "
                f"{size_text(new)}.")
        run.sleep(0.5)
        run.check_injected()
        with sim.lock:
            cfg_value = str(guest["config"].get(disk, ""))
            if "size=" in cfg_value:
                cfg_value = re.sub(r"size=[^,]+", f"size={size_text(new)}", cfg_value)
            else:
                cfg_value += f",size={size_text(new)}"
            guest["config"][disk] = cfg_value
            vol = storage_volumes(sim, guest["node"], storage).get(volid)
            if vol is not None:
                vol["size"] = new

    return sim.tasks.start(guest["node"], "resize", vmid, ctx.user, work, vmid=vmid)


@route("PUT", "/nodes/{node}/lxc/{vmid}/resize")
def lxc_resize(ctx: Ctx) -> Any:
    return _resize(ctx, "lxc")


@route("PUT", "/nodes/{node}/qemu/{vmid}/resize")
def qemu_resize(ctx: Ctx) -> Any:
    return _resize(ctx, "qemu")
