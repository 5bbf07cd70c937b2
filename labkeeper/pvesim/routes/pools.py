"""``/pools``: resource pools and their members."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.routes.common import guest_entry
from labkeeper.pvesim.routes.registry import Ctx, route

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


@route("GET", "/pools")
def pools_list(ctx: Ctx) -> Any:
    out = []
    for poolid, pool in sorted(ctx.sim.state["pools"].items()):
        if ctx.p.get("poolid") and ctx.p["poolid"] != poolid:
            continue
        entry: dict[str, Any] = {"poolid": poolid}
        if pool.get("comment"):
            entry["comment"] = pool["comment"]
        if ctx.p.get("poolid"):
            entry["members"] = _pool_members(ctx.sim, pool)
        out.append(entry)
    return out


def _pool_members(sim: Simulator, pool: dict[str, Any]) -> list[dict[str, Any]]:
    members = []
    for vmid in pool.get("vms", []):
        guest = sim.state["guests"].get(str(vmid))
        if guest is not None:
            entry = guest_entry(sim, guest)
            entry.update({"id": f"{guest['type']}/{vmid}", "node": guest["node"]})
            members.append(entry)
    return members


@route("POST", "/pools")
def pools_create(ctx: Ctx) -> Any:
    poolid = ctx.p["poolid"]
    if poolid in ctx.sim.state["pools"]:
        raise ApiError(500, f"pool '{poolid}' already exists")
    ctx.sim.state["pools"][poolid] = {"comment": ctx.p.get("comment", ""), "vms": []}
    return None


@route("GET", "/pools/{poolid}")
def pools_get(ctx: Ctx) -> Any:
    pool = ctx.sim.state["pools"].get(ctx.p["poolid"])
    if pool is None:
        raise ApiError(500, f"pool '{ctx.p['poolid']}' does not exist")
    return {"comment": pool.get("comment", ""), "members": _pool_members(ctx.sim, pool)}
