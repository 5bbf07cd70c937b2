"""``/nodes/{node}/storage``: storage status, content volumes and backup pruning."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim import prune
from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.perms import Principal, require
from labkeeper.pvesim.routes.common import check_node, guest_label
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import (
    archive_file,
    disk_volids,
    split_volid,
    storage_config,
    storage_used,
    storage_volumes,
    volume_path,
)
from labkeeper.pvesim.tasks import TaskRun

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def _storage_entry(sim: Simulator, node: str, sid: str) -> dict[str, Any]:
    cfg = sim.state["storages"][sid]
    used = storage_used(sim, node, sid)
    total = int(cfg["total"])
    avail = 0 if sim.faults.is_full(sid, node) else max(total - used, 0)
    if sim.faults.is_full(sid, node):
        used = total
    return {
        "storage": sid, "type": cfg["type"], "content": cfg["content"], "active": 1,
        "enabled": 1, "shared": int(cfg.get("shared", 0)), "total": total, "used": used,
        "avail": avail, "used_fraction": round(used / total, 6) if total else 0.0,
    }


@route("GET", "/nodes/{node}/storage")
def storage_list(ctx: Ctx) -> Any:
    sim, p = ctx.sim, ctx.p
    check_node(sim, p["node"])
    wanted = set(re.split(r"[,;\s]+", p["content"])) if p.get("content") else None
    out = []
    for sid in sorted(sim.state["storages"]):
        if p.get("storage") and p["storage"] != sid:
            continue
        cfg = sim.state["storages"][sid]
        if wanted and not wanted & set(cfg["content"].split(",")):
            continue
        if not ctx.principal.has(f"/storage/{sid}", "Datastore.Audit") and not \
                ctx.principal.has(f"/storage/{sid}", "Datastore.AllocateSpace"):
            continue
        out.append(_storage_entry(sim, p["node"], sid))
    return out


@route("GET", "/nodes/{node}/storage/{storage}")
def storage_index(ctx: Ctx) -> Any:
    check_node(ctx.sim, ctx.p["node"])
    storage_config(ctx.sim, ctx.p["storage"])
    return [{"subdir": s} for s in ("content", "prunebackups", "status")]


@route("GET", "/nodes/{node}/storage/{storage}/status")
def storage_status(ctx: Ctx) -> Any:
    check_node(ctx.sim, ctx.p["node"])
    storage_config(ctx.sim, ctx.p["storage"])
    entry = _storage_entry(ctx.sim, ctx.p["node"], ctx.p["storage"])
    del entry["storage"], entry["used_fraction"]
    return entry


def _content_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        k: entry[k] for k in ("volid", "content", "format", "size", "ctime") if k in entry
    }
    for key in ("vmid", "notes", "subtype"):
        if entry.get(key) not in (None, ""):
            out[key] = entry[key]
    if entry["content"] == "backup":
        out["protected"] = int(entry.get("protected", 0))
    if entry["content"] in ("images", "rootdir"):
        out["used"] = entry["size"] // 4
        if "/" in entry["volid"].split(":", 1)[1]:
            out["parent"] = entry["volid"].split(":", 1)[1].split("/")[0]
    return out


@route("GET", "/nodes/{node}/storage/{storage}/content")
def storage_content(ctx: Ctx) -> Any:
    sim, p = ctx.sim, ctx.p
    check_node(sim, p["node"])
    out = []
    for entry in sorted(storage_volumes(sim, p["node"], p["storage"]).values(),
                        key=lambda e: e["volid"]):
        if p.get("content") and entry["content"] != p["content"]:
            continue
        if p.get("vmid") is not None and entry.get("vmid") != p["vmid"]:
            continue
        out.append(_content_entry(entry))
    return out


def _content_volume(ctx: Ctx) -> dict[str, Any]:
    sim, p = ctx.sim, ctx.p
    check_node(sim, p["node"])
    volume = p["volume"]
    storage = p["storage"]
    volid = volume if ":" in volume else f"{storage}:{volume}"
    vstorage, _ = split_volid(volid)
    entry = storage_volumes(sim, p["node"], vstorage).get(volid)
    if entry is None:
        raise ApiError(500, f"volume '{volid}' does not exist")
    return entry


@route("GET", "/nodes/{node}/storage/{storage}/content/{volume}")
def storage_volume_get(ctx: Ctx) -> Any:
    entry = _content_volume(ctx)
    require(ctx.principal, f"/storage/{entry['volid'].split(':')[0]}", "Datastore.Audit",
            "Datastore.AllocateSpace", any_of=True)
    out = {"format": entry["format"], "size": entry["size"], "used": entry["size"],
           "path": volume_path(ctx.sim, entry["volid"], ctx.p["node"]),
           "protected": int(entry.get("protected", 0))}
    if entry.get("notes"):
        out["notes"] = entry["notes"]
    return out


def _check_backup_access(who: Principal, entry: dict[str, Any]) -> None:
    storage = entry["volid"].split(":")[0]
    if who.has(f"/storage/{storage}", "Datastore.Allocate"):
        return
    require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
    if entry["content"] == "backup" and entry.get("vmid") is not None:
        require(who, f"/vms/{entry['vmid']}", "VM.Backup")
    else:
        require(who, f"/storage/{storage}", "Datastore.Allocate")


@route("PUT", "/nodes/{node}/storage/{storage}/content/{volume}")
def storage_volume_put(ctx: Ctx) -> Any:
    entry = _content_volume(ctx)
    _check_backup_access(ctx.principal, entry)
    with ctx.sim.lock:
        if "notes" in ctx.p:
            entry["notes"] = ctx.p["notes"]
        if "protected" in ctx.p:
            entry["protected"] = int(ctx.p["protected"])
    return None


@route("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}")
def storage_volume_delete(ctx: Ctx) -> Any:
    sim = ctx.sim
    entry = _content_volume(ctx)
    _check_backup_access(ctx.principal, entry)
    volid = entry["volid"]
    if entry.get("protected"):
        raise ApiError(500, f"volume '{volid}' is protected")
    if entry["content"] in ("images", "rootdir"):
        guest = sim.state["guests"].get(str(entry.get("vmid")))
        if guest is not None and volid in disk_volids(guest["config"]).values():
            raise ApiError(500, f"volume '{volid}' is in use by {guest_label(guest['type'])} "
                                  f"{guest['vmid']}")
    node = ctx.p["node"]

    def work(run: TaskRun) -> None:
        run.sleep(0.25)
        run.check_injected()
        with sim.lock:
            storage_volumes(sim, node, volid.split(":")[0]).pop(volid, None)
        archive_file(sim, node, volid).unlink(missing_ok=True)
        if entry["content"] == "backup":
            run.log(f"Removed volume '{volid}'")

    return sim.tasks.start(node, "imgdel", volid, ctx.user, work)


def _retention(sim: Simulator, storage: str, given: str | None) -> dict[str, int]:
    text = given or sim.state["storages"][storage].get("prune-backups") or "keep-all=1"
    return prune.parse_retention(text)


def _prune_list(ctx: Ctx) -> list[dict[str, Any]]:
    sim, p = ctx.sim, ctx.p
    check_node(sim, p["node"])
    backups = [e for e in storage_volumes(sim, p["node"], p["storage"]).values()
               if e["content"] == "backup"]
    if p.get("vmid") is not None:
        backups = [b for b in backups if b.get("vmid") == p["vmid"]]
    if p.get("type"):
        backups = [b for b in backups if b.get("subtype") == p["type"]]
    return prune.prune_marks(backups, _retention(sim, p["storage"], p.get("prune-backups")))


@route("GET", "/nodes/{node}/storage/{storage}/prunebackups")
def prune_dryrun(ctx: Ctx) -> Any:
    return _prune_list(ctx)


@route("DELETE", "/nodes/{node}/storage/{storage}/prunebackups")
def prune_delete(ctx: Ctx) -> Any:
    sim, p = ctx.sim, ctx.p
    who = ctx.principal
    storage = p["storage"]
    if not who.has(f"/storage/{storage}", "Datastore.Allocate"):
        require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
        if p.get("vmid") is None:
            require(who, f"/storage/{storage}", "Datastore.Allocate")
        require(who, f"/vms/{p['vmid']}", "VM.Backup")
    marks = _prune_list(ctx)
    node = p["node"]
    retention = prune.format_retention(_retention(sim, storage, p.get("prune-backups")))

    def work(run: TaskRun) -> None:
        run.log(f"prune backups with retention: {retention}")
        run.sleep(0.5)
        run.check_injected()
        for entry in marks:
            if entry["mark"] == "remove":
                with sim.lock:
                    storage_volumes(sim, node, storage).pop(entry["volid"], None)
                archive_file(sim, node, entry["volid"]).unlink(missing_ok=True)
                run.log(f"removing backup '{entry['volid']}'")

    tid = f"{storage}" if p.get("vmid") is None else f"{storage}:{p['vmid']}"
    return sim.tasks.start(node, "prunebackups", tid, ctx.user, work)
