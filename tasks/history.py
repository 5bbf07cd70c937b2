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
