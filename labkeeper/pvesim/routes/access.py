"""``/access``: ticket login and the caller's permissions."""

from __future__ import annotations

from typing import Any

from labkeeper.pvesim.routes.registry import Ctx, route


@route("POST", "/access/ticket")
def access_ticket(ctx: Ctx) -> Any:
    return ctx.sim.create_ticket(ctx.p["username"], ctx.p["password"], ctx.p.get("realm"))


@route("GET", "/access/permissions")
def access_permissions(ctx: Ctx) -> Any:
    privs = ctx.principal.privileges
    if privs is None:
        return {"/": {p: 1 for p in ALL_PRIVILEGES}}
    if isinstance(privs, frozenset):
        return {"/": {p: 1 for p in sorted(privs)}}
    return {path: {p: 1 for p in sorted(v)} for path, v in privs.items()}


ALL_PRIVILEGES = (
    "Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate",
    "Datastore.Audit", "Pool.Allocate", "Pool.Audit", "Sys.Audit", "Sys.Modify",
    "Sys.PowerMgmt", "VM.Allocate", "VM.Audit", "VM.Backup", "VM.Clone", "VM.Config.CDROM",
    "VM.Config.CPU", "VM.Config.Cloudinit", "VM.Config.Disk", "VM.Config.HWType",
    "VM.Config.Memory", "VM.Config.Network", "VM.Config.Options", "VM.Console",
    "VM.Migrate", "VM.PowerMgmt", "VM.Snapshot", "VM.Snapshot.Rollback",
)
