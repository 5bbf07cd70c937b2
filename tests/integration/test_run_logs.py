"""labkeeper's module loggers land in the flow run's log on a real Prefect server."""

from __future__ import annotations

import asyncio
import logging
import threading

from prefect import flow, task

import flows  # noqa: F401  (the package import is what wires the loggers)
from labkeeper import log_setup

core_log = logging.getLogger("labkeeper.test_run_logs")


def _core_work(tag: str) -> None:
    core_log.info("core says %s from the flow", tag)
    seen: list[str] = []

    def in_thread() -> None:
        core_log.warning("core says %s from a thread", tag)
        seen.append("done")

    th = threading.Thread(target=log_setup.in_context(in_thread))
    th.start()
    th.join()
    assert seen == ["done"]


@task
def _core_task(tag: str) -> None:
    core_log.info("core says %s from a task", tag)


@flow
def _logging_flow(tag: str) -> None:
    _core_work(tag)
    _core_task(tag)


def _run_log(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)

    async def read():
        async with get_client() as client:
            return await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return asyncio.run(read())


def test_core_module_records_reach_the_runs_log_from_flow_task_and_thread(prefect_harness):
    state = _logging_flow("tag-7731", return_state=True)
    assert state.is_completed()
    logs = _run_log(state.state_details.flow_run_id)
    by_message = {rec.message: rec for rec in logs}
    for where in ("the flow", "a thread", "a task"):
        message = f"core says tag-7731 from {where}"
        assert message in by_message, f"missing: {message!r} in {sorted(by_message)}"
        assert by_message[message].name == "labkeeper.test_run_logs"
    assert by_message["core says tag-7731 from a task"].task_run_id is not None
    assert by_message["core says tag-7731 from a thread"].level == logging.WARNING
