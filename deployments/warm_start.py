"""Served deployment runs start from a warm process, not a fresh interpreter.

Prefect's runner starts each run of a flow it holds in memory with
``run_flow_in_subprocess``: a ``spawn`` process, a new interpreter that imports Prefect
and the flow's module again (≈2.3 s before the run's first byte, issue 24). Here the
same function runs with multiprocessing's ``forkserver`` context instead: one server
process, started by ``labkeeper serve``, imports labkeeper's flows once and forks a
child per run; the child unpickles the flow (its module is loaded already) and runs it
as Prefect's own ``run_flow_in_subprocess`` would (the same environment, control channel
and signal handling), at the patch point Prefect names
(``prefect.runner._starter_direct.run_flow_in_subprocess``). When serve's Prefect
settings are the forkserver's, the child keeps the forkserver's settings object instead
of building it twice more from the environment (≈60-80 ms a run). A backup run's
first restic starts before the engine's own start-up (:func:`ahead_of_run`).

Code changed on disk since serve started is never run from the stale imports: such a
run starts fresh (spawn), with a warning to restart serve. ``LABKEEPER_NO_RUNNER=1``
keeps Prefect's spawn for every run, as it does for the command line's runner.
"""

from __future__ import annotations

import contextlib
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


_forkserver_settings: frozenset[tuple[str, str]] | None = None
"""In the forkserver and its children: the Prefect settings it was started with
(:func:`settings_key`), set by :func:`remember_forkserver_settings` while it preloads."""


def explicit_settings() -> dict[str, str]:
    """This process's explicitly set Prefect settings, as environment variables."""
    from prefect.settings import get_current_settings

    return dict(get_current_settings().to_environment_variables(exclude_unset=True))


def settings_key(env: Mapping[str, str | None] | None = None,
                 explicit: Mapping[str, str] | None = None) -> frozenset[tuple[str, str]]:
    """The Prefect settings a run starts with: this process's explicitly set settings
    (``explicit``, when already read), with the settings in the run's own environment
    ``env`` over them."""
    explicit = dict(explicit_settings() if explicit is None else explicit)
    for name, value in (env or {}).items():
        if name.startswith("PREFECT_") and not name.startswith("PREFECT__") and value is not None:
            explicit[name] = value
    return frozenset(explicit.items())


def remember_forkserver_settings() -> None:
    """Called in the forkserver, after its imports (deployments/forkserver_freeze.py)."""
    global _forkserver_settings
    _forkserver_settings = settings_key()


def _run_warm(payload: bytes, startup_env: dict[str, str]) -> None:
    """A served run in a child of the forkserver: Prefect's ``run_flow_with_env``, with
    the forkserver's settings kept when the run's are the same."""
    import asyncio

    import cloudpickle
    from prefect import flow_engine
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import Settings

    os.environ.update(startup_env)
    flow_engine.configure_from_env()  # the runner's control channel (cancellation)
    flow, flow_run, parameters, wait_for, env, remove_env, key = cloudpickle.loads(payload)
    for name in remove_env:
        os.environ.pop(name, None)
    os.environ.update(env)
    with ahead_of_run(flow, parameters):
        current = get_settings_context()
        settings = current.settings if key == _forkserver_settings else Settings()
        with SettingsContext(profile=current.profile, settings=settings), \
                flow_engine.handle_engine_signals(getattr(flow_run, "id", None)):
            ran = flow_engine.run_flow(flow, flow_run=flow_run, parameters=parameters,
                                       wait_for=wait_for)
            if asyncio.iscoroutine(ran):
                asyncio.run(ran)


def ahead_of_run(flow: Any, parameters: Mapping[str, Any] | None
                 ) -> contextlib.AbstractContextManager[None]:
    """What a served run of ``flow`` starts before Prefect's engine does its own
    start-up: for a backup run, its first databases' restic
    (``flows.pg_backup.restic_ahead``); nothing for other flows."""
    if getattr(flow, "name", None) != "pg_backup":
        return contextlib.nullcontext()
    from flows.pg_backup import restic_ahead

    params = dict(parameters or {})
    return restic_ahead(**{k: params.get(k) for k in ("lab", "databases", "repository")})


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

    def run_flow_in_subprocess(self, flow: Any, flow_run: Any = None,
                               parameters: dict[str, Any] | None = None,
                               wait_for: Any = None, context: dict[str, Any] | None = None,
                               env: dict[str, str | None] | None = None) -> Any:
        """Prefect's ``run_flow_in_subprocess`` (same signature), the run forked from
        the warm process; Prefect's own (a fresh interpreter) when the code on disk
        changed or a serialized context is to be carried over."""
        from prefect import flow_engine

        if context is not None or not self.current():
            return flow_engine.run_flow_in_subprocess(
                flow, flow_run=flow_run, parameters=parameters, wait_for=wait_for,
                context=context, env=env)
        import cloudpickle

        explicit = explicit_settings()
        merged: dict[str, str | None] = {
            **explicit, **os.environ, "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
            **(env or {})}
        sanitized = flow_engine.sanitize_subprocess_env(merged)
        startup = {k: v for k, v in sanitized.items()
                   if k in flow_engine._CONTROL_CHANNEL_ENV_KEYS}
        payload = cloudpickle.dumps((
            flow, flow_run, parameters, wait_for,
            flow_engine._runtime_subprocess_env(sanitized),
            {k for k, v in merged.items() if v is None}, settings_key(env, explicit)))
        process = self.ctx.Process(target=_run_warm, args=(payload, startup))
        process.start()
        return process

    def start_server(self) -> None:
        """Start the forkserver now (it imports the flows while serve registers its
        deployments), so the first run is warm too."""
        from multiprocessing import forkserver

        forkserver.ensure_running()


def _direct_starter() -> Any:
    """Prefect's module that starts in-memory flows (None where a Prefect version has
    none: its own ``run_flow_in_subprocess`` then forks through the proxy)."""
    try:
        from prefect.runner import _starter_direct
    except ImportError:
        return None
    return _starter_direct if hasattr(_starter_direct, "run_flow_in_subprocess") else None


def install(environ: Mapping[str, str] = os.environ) -> WarmStart | None:
    """From now on, this process's served runs of in-memory flows fork from a warm
    process; None (Prefect's spawn kept) with ``LABKEEPER_NO_RUNNER`` set."""
    if disabled(environ):
        logger.debug("%s set: served runs start with Prefect's spawn", NO_RUNNER)
        return None
    from prefect import flow_engine

    warm = WarmStart()
    flow_engine.multiprocessing = _WarmWhenCurrent(warm.ctx, warm.current)  # type: ignore[attr-defined]
    starter = _direct_starter()
    if starter is not None:  # else Prefect's own function, forking through the proxy
        starter.run_flow_in_subprocess = warm.run_flow_in_subprocess
    warm.start_server()
    logger.info("served runs fork from a warm process (flows imported once)")
    return warm


def uninstall() -> None:
    """Prefect's spawn again (tests; serve's end)."""
    from prefect import flow_engine

    starter = _direct_starter()
    if starter is not None:
        starter.run_flow_in_subprocess = flow_engine.run_flow_in_subprocess
    if isinstance(flow_engine.multiprocessing, _WarmWhenCurrent):
        flow_engine.multiprocessing = multiprocessing  # type: ignore[attr-defined]
