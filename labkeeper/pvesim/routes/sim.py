"""The simulator's own API (not PVE): ``/_sim/faults`` and ``/_sim/requests``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def sim_endpoint(sim: Simulator, method: str, rel: str, params: dict[str, Any]) -> Any:
    """The simulator's own API (not PVE): ``/_sim/faults``, ``/_sim/requests``."""
    if rel.rstrip("/") == "/_sim/faults":
        if method == "GET":
            return sim.faults.snapshot()
        if method == "POST":
            try:
                sim.faults.apply(params)
            except (KeyError, ValueError) as exc:
                raise ApiError(400, f"bad fault: {exc}") from exc
            return sim.faults.snapshot()
        if method == "DELETE":
            sim.faults.clear()
            return None
    if rel.rstrip("/") == "/_sim/requests" and method == "GET":
        return list(sim.requests)
    raise ApiError(501, f"Method '{method} {rel}' not implemented")
