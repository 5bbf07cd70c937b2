"""``/cluster/backup`` and ``/cluster/backup-info``: scheduled backup jobs."""

from __future__ import annotations

import re
import secrets
from datetime import datetime
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.calendar import parse_calendar_event
from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.routes.common import guest_name, vmid_list
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import disk_volids, has_content, storage_config

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def _job_out(sim: Simulator, job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    out.setdefault("type", "vzdump")
    out.setdefault("enabled", 1)
    if out.get("enabled") and out.get("schedule"):
        event = parse_calendar_event(out["schedule"])
        nxt = event.next_after(datetime.now().astimezone())
        if nxt is not None:
            out["next-run"] = int(nxt.timestamp())
    return out


_JOB_STRUCTURED = ("prune-backups", "fleecing", "performance")


@route("GET", "/cluster/backup")
def backup_jobs(ctx: Ctx) -> Any:
    return [_job_out(ctx.sim, j) for _, j in sorted(ctx.sim.state["backup_jobs"].items())]


def _job_output_for_get(job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    for key in _JOB_STRUCTURED:
        if isinstance(out.get(key), str):
            values: dict[str, Any] = {}
            for part in out[key].split(","):
                k, sep, v = part.partition("=")
                if not sep:
                    k, v = "enabled", k
                values[k] = int(v) if v.isdigit() else v
            out[key] = values
    return out


@route("POST", "/cluster/backup")
def backup_job_create(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    jid = p.pop("id", None) or f"backup-{secrets.token_hex(4)}-{secrets.token_hex(2)}"
    if jid in sim.state["backup_jobs"]:
        raise ApiError(500, f"Job '{jid}' already exists")
    if not p.get("schedule"):
        p["schedule"] = p.pop("starttime", "00:00")
        if p.get("dow"):
            p["schedule"] = f"{p.pop('dow')} {p['schedule']}"
    if not p.get("vmid") and not p.get("all") and not p.get("pool"):
        raise ApiError(400, "Parameter verification failed.",
                         {"vmid": "no guests selected"})
    p.pop("starttime", None)
    p.pop("dow", None)
    p.setdefault("enabled", 1)
    if "storage" in p:
        scfg = storage_config(sim, p["storage"])
        if not has_content(scfg, "backup"):
            raise ApiError(500, f"storage '{p['storage']}' does not support backups")
    sim.state["backup_jobs"][jid] = {"id": jid, "type": "vzdump", **p}
    return None


def _job(ctx: Ctx) -> dict[str, Any]:
    job = ctx.sim.state["backup_jobs"].get(ctx.p["id"])
    if job is None:
        raise ApiError(500, f"job '{ctx.p['id']}' does not exist")
    return job


@route("GET", "/cluster/backup/{id}")
def backup_job_get(ctx: Ctx) -> Any:
    return _job_output_for_get(_job_out(ctx.sim, _job(ctx)))


@route("PUT", "/cluster/backup/{id}")
def backup_job_update(ctx: Ctx) -> Any:
    job = _job(ctx)
    p = dict(ctx.p)
    p.pop("id")
    deletes = [d for d in re.split(r"[,;\s]+", p.pop("delete", "")) if d]
    with ctx.sim.lock:
        for key in deletes:
            job.pop(key, None)
        if "starttime" in p or "dow" in p:
            p["schedule"] = f"{p.pop('dow', '')} {p.pop('starttime', '00:00')}".strip()
        job.update(p)
    return None


@route("DELETE", "/cluster/backup/{id}")
def backup_job_delete(ctx: Ctx) -> Any:
    _job(ctx)
    del ctx.sim.state["backup_jobs"][ctx.p["id"]]
    return None


@route("GET", "/cluster/backup/{id}/included_volumes")
def backup_job_volumes(ctx: Ctx) -> Any:
    job = _job(ctx)
    ids = _job_guests(ctx.sim, job)
    children = []
    for vmid in ids:
        guest = ctx.sim.state["guests"][str(vmid)]
        vols = [{"id": k, "name": v, "included": 1, "reason": "default"}
                for k, v in disk_volids(guest["config"]).items() if not k.startswith("unused")]
        children.append({"id": vmid, "type": guest["type"], "name": guest_name(guest),
                         "children": vols})
    return {"children": children}


def _job_guests(sim: Simulator, job: dict[str, Any]) -> list[int]:
    guests = sim.state["guests"]
    if int(job.get("all", 0)):
        ids = [int(v) for v in guests]
    elif job.get("pool"):
        ids = list(sim.state["pools"].get(job["pool"], {}).get("vms", []))
    else:
        ids = vmid_list(job.get("vmid"))
    excluded = set(vmid_list(job.get("exclude")))
    node = job.get("node")
    return sorted(v for v in ids if str(v) in guests and v not in excluded
                  and (node is None or guests[str(v)]["node"] == node))


@route("GET", "/cluster/backup-info/not-backed-up")
def not_backed_up(ctx: Ctx) -> Any:
    covered: set[int] = set()
    for job in ctx.sim.state["backup_jobs"].values():
        if int(job.get("enabled", 1)):
            covered.update(_job_guests(ctx.sim, job))
    out = []
    for guest in sorted(ctx.sim.state["guests"].values(), key=lambda g: g["vmid"]):
        if guest["vmid"] not in covered and not int(guest["config"].get("template", 0)):
            out.append({"vmid": guest["vmid"], "type": guest["type"],
                        "name": guest_name(guest)})
    return out
