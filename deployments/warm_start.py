"""Served deployment runs start from a warm process, not a fresh interpreter.

Prefect's runner starts each run of a flow it holds in memory with
``run_flow_in_subprocess``: a ``spawn`` process, a new interpreter that imports Prefect
and the flow's module again (≈2.3 s before the run's first byte, issue 24). Here the
same function runs with multiprocessing's ``forkserver`` context instead: one server
process, started by ``labkeeper serve``, imports labkeeper's flows once and forks a
child per run; the child unpickles the flow (its module is loaded already) and runs it
exactly as Prefect's own code would. Prefect names the patch point
(``prefect.runner._starter_direct.run_flow_in_subprocess``).

Code changed on disk since serve started is never run from the stale imports: such a
run starts fresh (spawn), with a warning to restart serve. ``LABKEEPER_NO_RUNNER=1``
keeps Prefect's spawn for every run, as it does for the command line's runner.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import os
from collections.abc import Callable, Mapping
from typing import Any

from labkeeper.code_stamp import code_stamp

logger = logging.getLogger("labkeeper.serve")  # printed like labkeeper's records

NO_RUNNER = "LABKEEPER_NO_RUNNER"
FREEZE = "deployments.forkserver_freeze"  # preloaded last: gc.freeze() after the imports
# What a flow run imports, loaded once in a warm process (this forkserver, and the
# command line's runner, cli/runner.py): every flow module, and what a first flow run
# imports on its way (~0.4 s): the engines, the parameter serializer, concurrency
# slots, tracing, the graph module.
PRELOAD = ("prefect", "flows.pg_backup", "flows.path_backup", "flows.dr_drill",
           "flows.doctor", "flows.repo_maintenance", "flows.update", "flows.provision",
           "flows.vzdump", "flows.runbook", "flows.pitr", "flows.deadman", "flows.restore",
           "flows.site_check",
           "prefect.flow_engine", "prefect.task_engine", "fastapi.encoders",
           "prefect.concurrency.sync", "prefect.concurrency.v1.sync", "opentelemetry.trace",
           "graphviz")


def disabled(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(NO_RUNNER, "").strip() not in ("", "0")


class _WarmWhenCurrent:
    """Stands in for the ``multiprocessing`` module inside ``prefect.flow_engine``:
    ``get_context("spawn")`` answers the preloaded forkserver context while the code on
    disk is the code the forkserver imported; everything else is multiprocessing's."""

    def __init__(self, ctx: Any, current: Callable[[], bool]) -> None:
        self._ctx = ctx
        self._current = current

    def get_context(self, method: str | None = None) -> Any:
        if method == "spawn" and self._current():
            return self._ctx
        return multiprocessing.get_context(method)

    def __getattr__(self, name: str) -> Any:
        return getattr(multiprocessing, name)


class WarmStart:
    """The forkserver this process's served runs fork from, and whether it is current."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        self.stamp = code_stamp()
        self.ctx = multiprocessing.get_context("forkserver")
        self.ctx.set_forkserver_preload([*(m for m in preload if importlib.util.find_spec(m)),
                                         FREEZE])
        self._warned = False

    def current(self) -> bool:
        if code_stamp() == self.stamp:
            return True
        if not self._warned:
            logger.warning("labkeeper's code changed on disk since serve started: served "
                           "runs start fresh (slower) until serve is restarted")
            self._warned = True
        return False

    def start_server(self) -> None:
        """Start the forkserver now (it imports the flows while serve registers its
        deployments), so the first run is warm too."""
        from multiprocessing import forkserver

        forkserver.ensure_running()


def install(environ: Mapping[str, str] = os.environ) -> WarmStart | None:
    """From now on, this process's served runs of in-memory flows fork from a warm
    process; None (Prefect's spawn kept) with ``LABKEEPER_NO_RUNNER`` set."""
    if disabled(environ):
        logger.debug("%s set: served runs start with Prefect's spawn", NO_RUNNER)
        return None
    from prefect import flow_engine

    warm = WarmStart()
    flow_engine.multiprocessing = _WarmWhenCurrent(warm.ctx, warm.current)  # type: ignore[attr-defined]
    warm.start_server()
    logger.info("served runs fork from a warm process (flows imported once)")
    return warm


def uninstall() -> None:
    """Prefect's spawn again (tests; serve's end)."""
    from prefect import flow_engine

    if isinstance(flow_engine.multiprocessing, _WarmWhenCurrent):
        flow_engine.multiprocessing = multiprocessing  # type: ignore[attr-defined]
