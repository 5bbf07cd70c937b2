"""The Prefect run history, read through the client (for `labkeeper status`)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any


def failed_runs(days: int = 7) -> list[dict[str, Any]]:
    """Failed and crashed flow runs that started in the last ``days`` days."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    since = datetime.now(UTC) - timedelta(days=days)

    async def read() -> list[dict[str, Any]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    start_time=FlowRunFilterStartTime(after_=since),
                    state=FlowRunFilterState(type=FlowRunFilterStateType(
                        any_=[StateType.FAILED, StateType.CRASHED])),
                ),
                limit=200,
            )
            flows = {}
            for r in runs:
                if r.flow_id not in flows:
                    flows[r.flow_id] = (await client.read_flow(r.flow_id)).name
            return [{"name": r.name, "flow": flows[r.flow_id],
                     "state": r.state.name if r.state else "Failed",
                     "start": r.start_time} for r in runs]

    return asyncio.run(read())


def late_runs() -> list[dict[str, Any]]:
    """Flow runs the server marked Late (due, but no worker took them), each with its
    work queue and whether any worker polls that queue: a site without a live worker
    shows here. Same row shape as :func:`failed_runs`, state ``Late``."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateName,
    )

    async def read() -> list[dict[str, Any]]:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    name=FlowRunFilterStateName(any_=["Late"]))), limit=200)
            flows: dict[Any, str] = {}
            queues: dict[tuple[str, str], Any] = {}
            out = []
            for r in runs:
                if r.flow_id not in flows:
                    flows[r.flow_id] = (await client.read_flow(r.flow_id)).name
                key = (r.work_pool_name or "", r.work_queue_name or "")
                if key not in queues and all(key):
                    queues[key] = await client.read_work_queue_by_name(
                        key[1], work_pool_name=key[0])
                out.append({"name": r.name, "flow": flows[r.flow_id], "state": "Late",
                            "start": r.expected_start_time,
                            "detail": _late_detail(key, queues.get(key))})
            return out

    return asyncio.run(read())


def _late_detail(key: tuple[str, str], queue: Any) -> str:
    pool, name = key
    if queue is None:
        return "Late: not on a work queue"
    polled = getattr(queue, "last_polled", None)
    status = getattr(queue.status, "value", queue.status)
    if status == "PAUSED":
        return f"Late: queue {name} of pool {pool} is paused"
    if status == "READY":
        return f"Late: queue {name} of pool {pool} has a worker, but it has not taken the run"
    when = polled.isoformat(timespec="seconds") if polled else "never"
    return f"Late: no live worker polls queue {name} of pool {pool} (last polled: {when})"
