"""``/nodes/{node}/tasks``: task list, status, log and stop."""

from __future__ import annotations

from typing import Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.perms import PermissionDenied
from labkeeper.pvesim.routes.common import check_node
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.tasks import parse_upid


@route("GET", "/nodes/{node}/tasks")
def tasks_list(ctx: Ctx) -> Any:
    p = ctx.p
    check_node(ctx.sim, p["node"])
    source = p.get("source", "archive")
    out = []
    for task in reversed(ctx.sim.state["tasks"]):
        if task["node"] != p["node"]:
            continue
        running = task["status"] == "running"
        if (source == "archive" and running) or (source == "active" and not running):
            continue
        if p.get("vmid") is not None and task["id"] != str(p["vmid"]):
            continue
        if p.get("typefilter") and task["type"] != p["typefilter"]:
            continue
        if p.get("userfilter") and p["userfilter"] not in task["user"]:
            continue
        if p.get("errors") and task.get("exitstatus") in ("OK", None):
            continue
        if p.get("since") and task["starttime"] < p["since"]:
            continue
        if p.get("until") and task["starttime"] > p["until"]:
            continue
        entry = {k: task[k] for k in ("upid", "node", "pid", "pstart", "starttime", "type", "id",
                                      "user")}
        if not running:
            entry["status"] = task["exitstatus"]
            entry["endtime"] = task["endtime"]
        out.append(entry)
    start = int(p.get("start", 0))
    limit = int(p.get("limit", 50))
    return out[start:start + limit]


def _task(ctx: Ctx) -> dict[str, Any]:
    upid = ctx.p["upid"]
    parsed = parse_upid(upid)
    if parsed is None:
        raise ApiError(400, "Parameter verification failed.",
                         {"upid": "unable to parse worker upid"})
    if parsed["node"] != ctx.p["node"]:
        raise ApiError(500, f"no such task '{upid}'")
    task = ctx.sim.tasks.find(upid)
    if task is None:
        raise ApiError(500, f"no such task '{upid}'")
    user = ctx.user
    if ctx.who is not None and not ctx.who.unlimited and task["user"] != user and \
            task["user"] != user.split("!")[0] and not ctx.principal.has(
                f"/nodes/{task['node']}", "Sys.Audit"):
        raise PermissionDenied(f"Permission check failed (/nodes/{task['node']}, Sys.Audit)")
    return task


@route("GET", "/nodes/{node}/tasks/{upid}")
def task_index(ctx: Ctx) -> Any:
    _task(ctx)
    return [{"name": "log"}, {"name": "status"}]


@route("GET", "/nodes/{node}/tasks/{upid}/status")
def task_status(ctx: Ctx) -> Any:
    task = _task(ctx)
    out = {k: task[k] for k in ("upid", "node", "pid", "pstart", "starttime", "type", "id",
                                "user", "status")}
    if task["status"] == "stopped":
        out["exitstatus"] = task["exitstatus"]
    return out


@route("GET", "/nodes/{node}/tasks/{upid}/log")
def task_log(ctx: Ctx) -> Any:
    task = _task(ctx)
    with ctx.sim.lock:
        lines = list(task["log"])
    if not lines:
        return [{"n": 1, "t": "no content"}]
    start = int(ctx.p.get("start", 0))
    limit = int(ctx.p.get("limit", 50))
    return [{"n": i + 1, "t": text} for i, text in enumerate(lines)][start:start + limit]


@route("DELETE", "/nodes/{node}/tasks/{upid}")
def task_stop(ctx: Ctx) -> Any:
    task = _task(ctx)
    if task["status"] == "running":
        ctx.sim.tasks.stop_task(task["upid"])
    return None
