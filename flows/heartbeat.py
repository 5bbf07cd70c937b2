"""A flow run's end does not wait for its heartbeat thread to wake up.

Prefect's flow engine sends a flow run's heartbeats from a thread that sleeps one
second at a time between checks of its stop flag, and a sync flow's end joins that
thread: every run pays up to a second (≈0.7 s measured, issue 24) after its work is
done. :func:`install` puts in the same context manager, waiting on the stop flag
itself, so the thread ends the moment the run does. What is sent, when, and with which
context is Prefect's own code otherwise; a Prefect without ``_send_heartbeats`` keeps
its own (the install says so in the log).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Generator[None, None, None]:
    """Prefect's ``_send_heartbeats``: a heartbeat now and every ``heartbeat_seconds``
    (at least Prefect's minimum) until the run's block ends or its state is final;
    the wait between heartbeats is the stop flag's, so the end never waits on a sleep."""
    from prefect import flow_engine

    seconds = engine.heartbeat_seconds
    if seconds is None:
        yield
        return
    seconds = max(seconds, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            state = engine.flow_run.state if engine.flow_run else None
            if state is not None and state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # a missed heartbeat is Prefect's debug line, not a failure
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            stop.wait(seconds)

    # the thread sees the run's settings context (its API URL), as Prefect's does
    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,),
                              daemon=True, name="flow-run-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=2)


def install() -> bool:
    """Use :func:`send_heartbeats` for this process's flow runs; False (and a debug
    line) when this Prefect has no ``_send_heartbeats`` to stand in for."""
    from prefect import flow_engine

    if not callable(getattr(flow_engine, "_send_heartbeats", None)):
        logger.debug("prefect.flow_engine has no _send_heartbeats; heartbeats unchanged")
        return False
    flow_engine._send_heartbeats = send_heartbeats  # type: ignore[attr-defined]
    return True
