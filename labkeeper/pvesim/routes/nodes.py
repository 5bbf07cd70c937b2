"""``/version`` and ``/nodes``: the cluster's nodes and their status."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.routes.common import check_node
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.state import GiB

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


PVE_VERSION = {"version": "9.1.1", "release": "9.1", "repoid": "42ab5c7e"}


PVEVERSION_STRING = "pve-manager/9.1.1/42ab5c7e07b8e4d1"


KERNEL = "6.17.2-1-pve"


@route("GET", "/version")
def version(ctx: Ctx) -> Any:
    return dict(PVE_VERSION)


@route("GET", "/nodes")
def nodes(ctx: Ctx) -> Any:
    return [node_entry(ctx.sim, node) for node in ctx.sim.state["nodes"]
            if ctx.principal.has(f"/nodes/{node}", "Sys.Audit") or True]


def node_entry(sim: Simulator, node: str) -> dict[str, Any]:
    uptime = int(time.time()) - int(sim.state["started"])
    return {
        "node": node,
        "id": f"node/{node}",
        "type": "node",
        "status": "online",
        "cpu": 0.03,
        "maxcpu": 8,
        "mem": 6 * GiB,
        "maxmem": 32 * GiB,
        "disk": 12 * GiB,
        "maxdisk": 100 * GiB,
        "uptime": max(uptime, 1),
        "level": "",
        "ssl_fingerprint": sim.fingerprint,
    }


@route("GET", "/nodes/{node}")
def node_index(ctx: Ctx) -> Any:
    check_node(ctx.sim, ctx.p["node"])
    return [{"name": n} for n in ("lxc", "qemu", "status", "storage", "tasks", "vzdump")]


@route("GET", "/nodes/{node}/status")
def node_status(ctx: Ctx) -> Any:
    check_node(ctx.sim, ctx.p["node"])
    uptime = max(1, int(time.time()) - int(ctx.sim.state["started"]))
    return {
        "boot-info": {"mode": "efi", "secureboot": 0},
        "cpu": 0.03,
        "cpuinfo": {"cores": 4, "cpus": 8, "model": "Simulated CPU", "sockets": 1,
                    "mhz": "3000.000"},
        "current-kernel": {"machine": "x86_64", "release": KERNEL, "sysname": "Linux",
                           "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.17.2-1"},
        "loadavg": ["0.10", "0.12", "0.09"],
        "memory": {"available": 26 * GiB, "free": 26 * GiB, "total": 32 * GiB,
                   "used": 6 * GiB},
        "pveversion": PVEVERSION_STRING,
        "kversion": f"Linux {KERNEL}",
        "rootfs": {"avail": 88 * GiB, "free": 88 * GiB, "total": 100 * GiB, "used": 12 * GiB},
        "swap": {"free": 8 * GiB, "total": 8 * GiB, "used": 0},
        "uptime": uptime,
        "wait": 0,
    }
