"""Served deployment runs start from the warm process (deployments/warm_start.py), on a
real Prefect server with a real `run_served` process: the run forks from the server that
imported the flows (not a fresh interpreter), reads serve's environment, is marked
Crashed when its process is killed, and with ``LABKEEPER_NO_RUNNER=1`` starts the way
Prefect's spawn starts it. Every process is stopped by PID."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labkeeper.locallab.services import Service, log_tail
from tests.fixtures.procs import gone, start_time
from tests.fixtures.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
# Ctrl-C's default first: a suite started in the background without job control hands
# its children SIGINT ignored, and a foreground serve is what these tests stop.
SERVE = (sys.executable, "-c", "import signal; signal.signal(signal.SIGINT, "
         "signal.default_int_handler); from tests.integration.served_probe import main; main()")


def _api(coro_fn: Any) -> Any:
    from prefect.client.orchestration import get_client

    async def go() -> Any:
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


@pytest.fixture
def served(prefect_harness: None, tmp_path: Path, request: pytest.FixtureRequest
           ) -> Iterator[Service]:
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_API_URL": str(PREFECT_API_URL.value()),
           "PREFECT_RUNNER_POLL_FREQUENCY": "1", "LK_PROBE_MARKER": "from-serve",
           "LABKEEPER_NO_RUNNER": getattr(request, "param", "")}
    svc = Service("serve-probe", SERVE, log_path=tmp_path / "serve.log", cwd=REPO,
                  stop_signal=signal.SIGINT, env=env)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop(grace=20)


def _deployment_id(svc: Service, log: Path) -> Any:
    deadline = time.monotonic() + 120
    while True:
        svc.check_alive()
        try:
            return _api(lambda c: c.read_deployment_by_name("probe/probe")).id
        except Exception:
            assert time.monotonic() < deadline, log_tail(log, 40)
            time.sleep(0.2)


def _start(svc: Service, tmp: Path, **params: Any) -> tuple[Any, Path]:
    out = tmp / f"probe-{time.monotonic_ns()}.json"
    dep = _deployment_id(svc, tmp / "serve.log")
    run = _api(lambda c: c.create_flow_run_from_deployment(
        dep, parameters={"out": str(out), **params}))
    return run.id, out


def _final(svc: Service, run_id: Any, log: Path, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        svc.check_alive()
        run = _api(lambda c: c.read_flow_run(run_id))
        if run.state is not None and run.state.is_final():
            return run
        assert time.monotonic() < deadline, f"run still {run.state}\n{log_tail(log, 40)}"
        time.sleep(0.2)


def _wait_file(svc: Service, path: Path, log: Path, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text()):
        svc.check_alive()
        assert time.monotonic() < deadline, log_tail(log, 40)
        time.sleep(0.1)
    return dict(json.loads(path.read_text()))


def _completed_run(svc: Service, tmp: Path) -> dict[str, Any]:
    """One probe run to Completed; what its process saw."""
    log = tmp / "serve.log"
    run_id, out = _start(svc, tmp)
    run = _final(svc, run_id, log)
    seen = _wait_file(svc, out, log)
    assert run.state.is_completed(), f"{run.state}\n{log_tail(log, 40)}"
    return seen


def test_served_run_forks_from_the_warm_process_with_the_flows_imported(
        served: Service, tmp_path: Path) -> None:
    seen = _completed_run(served, tmp_path)
    assert seen["ppid"] != served.pid, "a spawn child of serve, not a fork of the warm server"
    assert seen["preloaded"], "flows were imported anew in the run's process"
    assert seen["frozen"] > 100_000  # the imports are out of the collector's reach
    assert seen["heartbeat"]
    assert seen["marker"] == "from-serve"  # serve's environment reaches the run


@pytest.mark.parametrize("served", ["1"], indirect=True)
def test_served_run_with_no_runner_set_starts_in_prefects_spawn_process(
        served: Service, tmp_path: Path) -> None:
    seen = _completed_run(served, tmp_path)
    assert seen["ppid"] == served.pid
    assert not seen["preloaded"] and seen["frozen"] == 0
    assert seen["heartbeat"]  # importing the flows package installs it in any process


def test_killed_warm_run_is_marked_crashed_and_serve_keeps_serving(
        served: Service, tmp_path: Path) -> None:
    import os

    log = tmp_path / "serve.log"
    run_id, out = _start(served, tmp_path, hold=300)
    seen = _wait_file(served, out, log)
    os.kill(seen["pid"], signal.SIGKILL)
    run = _final(served, run_id, log)
    assert run.state.is_crashed(), f"{run.state}\n{log_tail(log, 40)}"
    again, out2 = _start(served, tmp_path)  # the next run still forks warm
    assert _final(served, again, log).state.is_completed(), log_tail(log, 40)
    assert _wait_file(served, out2, log)["preloaded"]


@pytest.mark.parametrize("how", ["ctrl-c", "killed"])
def test_serve_ended_leaves_no_warm_process_behind(served: Service, tmp_path: Path,
                                                   how: str) -> None:
    import os
    import subprocess

    warm = _completed_run(served, tmp_path)["ppid"]
    started = start_time(warm)
    assert warm != served.pid and not gone(warm, started)
    assert served.proc is not None
    # serve alone, as Ctrl-C or the OOM killer reaches it
    os.kill(served.pid, signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    try:
        served.proc.wait(120)
    except subprocess.TimeoutExpired:
        # Prefect's exit waits, unbounded, for its events to be sent: on a machine
        # loaded enough that they lag, serve is still leaving. Killed, it is gone now.
        served.proc.kill()
        served.proc.wait(30)
    wait_until(lambda: gone(warm, started), timeout=30, what="the forkserver gone with serve")


def test_cancelling_a_warm_run_ends_its_process_and_marks_it_cancelled(
        served: Service, tmp_path: Path) -> None:
    from prefect.states import Cancelling

    log = tmp_path / "serve.log"
    run_id, out = _start(served, tmp_path, hold=300)
    seen = _wait_file(served, out, log)
    started = start_time(seen["pid"])
    _api(lambda c: c.set_flow_run_state(run_id, Cancelling(), force=True))  # the UI's Cancel
    run = _final(served, run_id, log)
    assert run.state.is_cancelled(), f"{run.state}\n{log_tail(log, 40)}"
    wait_until(lambda: gone(seen["pid"], started), timeout=30, what="the run's process ended")
