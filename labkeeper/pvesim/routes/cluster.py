"""``/cluster/status``, ``/cluster/nextid`` and ``/cluster/resources``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.routes.common import guest_entry
from labkeeper.pvesim.routes.nodes import node_entry
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import storage_used

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


@route("GET", "/cluster/status")
def cluster_status(ctx: Ctx) -> Any:
    sim = ctx.sim
    out: list[dict[str, Any]] = [{
        "id": "cluster", "name": sim.cluster_name, "type": "cluster",
        "nodes": len(sim.state["nodes"]), "quorate": 1, "version": len(sim.state["nodes"]),
    }]
    for i, node in enumerate(sim.state["nodes"], start=1):
        out.append({"id": f"node/{node}", "name": node, "type": "node", "nodeid": i,
                    "online": 1, "local": 1 if i == 1 else 0, "ip": f"127.0.0.{i}",
                    "level": ""})
    return out


@route("GET", "/cluster/nextid")
def nextid(ctx: Ctx) -> Any:
    guests = ctx.sim.state["guests"]
    wanted = ctx.p.get("vmid")
    if wanted is not None:
        if str(wanted) in guests:
            raise ApiError(400, "Parameter verification failed.",
                             {"vmid": f"VM {wanted} already exists"})
        return int(wanted)
    vmid = 100
    while str(vmid) in guests:
        vmid += 1
    return vmid


@route("GET", "/cluster/resources")
def cluster_resources(ctx: Ctx) -> Any:
    rtype = ctx.p.get("type")
    out: list[dict[str, Any]] = []
    if rtype in (None, "vm"):
        out.extend(_vm_resources(ctx))
    if rtype in (None, "node"):
        out.extend(_node_resources(ctx.sim))
    if rtype in (None, "storage"):
        out.extend(_storage_resources(ctx))
    if rtype is None:
        for poolid in sorted(ctx.sim.state["pools"]):
            out.append({"id": f"/pool/{poolid}", "type": "pool", "pool": poolid})
    return out


def _vm_resources(ctx: Ctx) -> list[dict[str, Any]]:
    out = []
    for guest in sorted(ctx.sim.state["guests"].values(), key=lambda g: g["vmid"]):
        if not ctx.principal.has(f"/vms/{guest['vmid']}", "VM.Audit"):
            continue
        entry = guest_entry(ctx.sim, guest)
        entry.update({"id": f"{guest['type']}/{guest['vmid']}", "node": guest["node"],
                      "maxcpu": entry.pop("cpus")})
        if guest.get("pool"):
            entry["pool"] = guest["pool"]
        out.append(entry)
    return out


def _node_resources(sim: Simulator) -> list[dict[str, Any]]:
    out = []
    for node in sim.state["nodes"]:
        entry = node_entry(sim, node)
        entry.pop("ssl_fingerprint")
        entry["cgroup-mode"] = 2
        out.append(entry)
    return out


def _storage_resources(ctx: Ctx) -> list[dict[str, Any]]:
    sim, out = ctx.sim, []
    for node in sim.state["nodes"]:
        for sid, cfg in sim.state["storages"].items():
            if not ctx.principal.has(f"/storage/{sid}", "Datastore.Audit"):
                continue
            used = storage_used(sim, node, sid)
            out.append({
                "id": f"storage/{node}/{sid}", "type": "storage", "storage": sid,
                "node": node, "status": "available", "content": cfg["content"],
                "plugintype": cfg["type"], "shared": cfg.get("shared", 0),
                "disk": used, "maxdisk": int(cfg["total"]),
            })
    return out
