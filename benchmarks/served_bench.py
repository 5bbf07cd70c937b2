"""A served deployment's backup run (`labkeeper serve`) vs the bare pipeline, in one run
(issue 24; deployments/warm_start.py).

Run: .venv/bin/python benchmarks/served_bench.py [--scale 30] [--repeat 3]

Reuses run_cost_bench.py's scaffolding (LocalLab, a pgbench database with random filler,
a running Prefect server). `labkeeper serve --lab one.yaml` serves every deployment,
once with warm starts (the default) and once with ``LABKEEPER_NO_RUNNER=1`` (Prefect's
spawn: a fresh interpreter per run); ``--modes warm,not-ahead`` compares warm starts with
and without the dump's restic started ahead of the engine (``LABKEEPER_NO_AHEAD=1``).
Each run of ``nightly-pg-backup`` for the bench database is created through the API
(the Run button's call) and read back when final.
From the run's own state history:

- *served run*: Pending (the runner took it and starts its process) → Completed: what
  the run costs once picked up; the ratio is to the bare pipeline beside it;
- *to Running*: Pending → Running, the process start up to the engine's first call;
- *to first log line*: Pending → the first line of labkeeper's own code in the run.

Created → Pending is the runner's poll (``PREFECT_RUNNER_POLL_FREQUENCY``, Prefect's
default 10 s here; scheduled runs are fetched ahead of time) and is not the run's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_cost_bench import ROOT, Bench, prepared, spread

DEPLOYMENT = "pg_backup/nightly-pg-backup"


async def _deployment_id(name: str) -> Any:
    from prefect.client.orchestration import get_client

    async with get_client() as c:
        return (await c.read_deployment_by_name(name)).id


async def _run_once(deployment_id: Any) -> dict[str, float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as c:
        run = await c.create_flow_run_from_deployment(
            deployment_id, parameters={"databases": ["bench"]})
        while True:
            r = await c.read_flow_run(run.id)
            if r.state is not None and r.state.is_final():
                break
            # The figures come from the run's own state history, not from this poll;
            # polling at 0.1 s cost the server ~0.6-1 s of CPU per run, beside the run.
            await asyncio.sleep(1.0)
        if not r.state.is_completed():
            raise SystemExit(f"served run ended {r.state.type.value}: {r.state.message}")
        states = {s.type.value: s.timestamp for s in await c.read_flow_run_states(run.id)}
        logs = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    pending = states["PENDING"]
    first = min((lg.timestamp for lg in logs if lg.name.startswith("labkeeper")),
                default=states["COMPLETED"])
    return {"served run": (states["COMPLETED"] - pending).total_seconds(),
            "to Running": (states["RUNNING"] - pending).total_seconds(),
            "to first log line": (first - pending).total_seconds(),
            "created to Completed": (states["COMPLETED"] - r.created).total_seconds()}


class Served:
    """`labkeeper serve` in a process group of its own, stopped by its pid."""

    def __init__(self, b: Bench, mode: str) -> None:
        # Prefect's default poll (10 s): a serve polling faster loads the machine more
        self.env = {**b.env_server,
                    "LABKEEPER_PREFECT_HOME": str(b.work / f"serve-home-{mode}")}
        if mode == "spawn":
            self.env["LABKEEPER_NO_RUNNER"] = "1"
        if mode == "not-ahead":  # warm, the dump's restic started by the backup itself
            self.env["LABKEEPER_NO_AHEAD"] = "1"
        self.log = (b.work / f"serve-{mode}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--lab", str(b.inv_one)],
            cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop(self) -> None:
        with_group = self.proc.pid
        try:
            os.killpg(with_group, signal.SIGINT)
            self.proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(with_group, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def _wait_deployment(api_url: str) -> Any:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + 180
    with temporary_settings({PREFECT_API_URL: api_url}):
        while True:
            try:
                return asyncio.run(_deployment_id(DEPLOYMENT))
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def measure(b: Bench, mode: str, repeat: int) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    served = Served(b, mode)
    try:
        dep = _wait_deployment(b.server.api_url)
        with temporary_settings({PREFECT_API_URL: b.server.api_url}):
            asyncio.run(_run_once(dep))  # warm-up: caches, the forkserver's imports
            for _ in range(repeat):
                bare = b.bare()
                b.add("bare", bare)
                got = asyncio.run(_run_once(dep))
                for key, value in got.items():
                    b.add(f"{mode}: {key}", value)
                b.add(f"{mode}: served run / bare", got["served run"] / bare)
    finally:
        served.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="warm,spawn",
                    help="comma-separated: warm, spawn (LABKEEPER_NO_RUNNER=1), not-ahead "
                         "(warm with LABKEEPER_NO_AHEAD=1)")
    args = ap.parse_args()
    args.small = 1
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    with prepared("lk-servedbench-", args) as b:
        b.bare()  # warm-up
        for mode in (modes * 2 if args.repeat >= 2 else modes):
            measure(b, mode, max(1, args.repeat // 2) if args.repeat >= 2 else 1)
        print(f"\nload average now {os.getloadavg()[0]:.1f}; medians (min-max), s")
        for key, values in b.results.items():
            print(f"  {key:36} {spread(values)}")
        for mode in modes:
            r = b.results.get(f"{mode}: served run / bare")
            if r:
                print(f"  {mode}: served run / bare = {statistics.median(r):.2f}x")


if __name__ == "__main__":
    main()
