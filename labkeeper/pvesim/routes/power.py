"""``.../status/{start,stop,shutdown,reboot}`` for containers and VMs."""

from __future__ import annotations

import time
from functools import partial

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.perms import PermissionDenied
from labkeeper.pvesim.routes.common import check_lock, find_guest, guest_label
from labkeeper.pvesim.routes.registry import ROUTES, Ctx
from labkeeper.pvesim.tasks import TaskRun


def _power(ctx: Ctx, gtype: str, action: str) -> str:
    sim = ctx.sim
    guest = find_guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    vmid, label = guest["vmid"], guest_label(gtype)
    skiplock = bool(ctx.p.get("skiplock"))
    if skiplock and ctx.user != "root@pam":
        raise PermissionDenied("Permission check failed (skiplock: only root may use this option)")
    check_lock(guest, skiplock)
    running = guest["status"] == "running"
    if action == "start":
        if int(guest["config"].get("template", 0)):
            raise ApiError(500, "you can't start a CT if it's a template" if gtype == "lxc"
                             else "you can't start a vm if it's a template")
        if running:
            raise ApiError(500, f"{label} {vmid} already running")
    elif not running:
        raise ApiError(500, f"{label} {vmid} not running")
    prefix = "vz" if gtype == "lxc" else "qm"

    def work(run: TaskRun) -> None:
        run.sleep()
        run.check_injected()
        with sim.lock:
            if action in ("start", "reboot"):
                guest["status"] = "running"
                guest["started_at"] = time.time()
            else:
                guest["status"] = "stopped"
                guest["started_at"] = None

    return sim.tasks.start(guest["node"], f"{prefix}{action}", vmid, ctx.user, work, vmid=vmid)


for _gtype in ("lxc", "qemu"):
    for _action in ("start", "stop", "shutdown", "reboot"):
        ROUTES[("POST", f"/nodes/{{node}}/{_gtype}/{{vmid}}/status/{_action}")] = partial(
            _power, gtype=_gtype, action=_action
        )
