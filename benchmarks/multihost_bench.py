"""Several machines (issue 20): what a worker on another host costs, and the server at a
week of history.

Run: .venv/bin/python benchmarks/multihost_bench.py [--rounds 5] [--runs 2000] [--tasks 3]

As root (network namespaces). Starts its own LocalLab (PostgreSQL, moto S3, sshd) and
the multi-host set-up of the e2e tests (tests/fixtures/multihost.py: a Prefect server on
the lab's PostgreSQL with an auth string, workers in network namespaces plus one on
this host), then measures:

1. trigger -> Completed of the `site-check` deployment, run by the worker in namespace
   `core` (the API through the veth) and by the worker on this host (loopback),
   rounds interleaved; both workers poll every second; and the median API round trip
   (GET /api/health, 200 times) from each place: the load average dominates the first,
   the second isolates what the other host's network path costs;
2. the server's RSS (its process group) before and after adding ``--runs`` completed
   flow runs with ``--tasks`` task runs and 5 log lines each, spread over 7 days,
   created through the API;
3. the runs list at that size: ``POST /api/flow_runs/filter`` (newest 50 and 200),
   ``/api/flow_runs/paginate`` (the UI's runs page), ``/api/flow_runs/count``;
   median of 10 calls each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkeeper.locallab.lab import LocalLab  # noqa: E402
from tests.fixtures.multihost import MultiHost  # noqa: E402


def group_rss_mb(pid: int) -> float:
    """RSS of every process in ``pid``'s process group (the server and its children)."""
    import os

    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pid:
                continue
            for line in Path(f"/proc/{entry.name}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return total / 1024


def trigger_to_completed(mh: MultiHost, deployment: str) -> float:
    async def create(client: Any) -> Any:
        dep = await client.read_deployment_by_name(deployment)
        return await client.create_flow_run_from_deployment(dep.id)

    t0 = time.monotonic()
    run = mh.client(create)
    while True:
        state = mh.client(lambda c: c.read_flow_run(run.id)).state
        if state is not None and state.is_final():
            if not state.is_completed():
                raise RuntimeError(f"{deployment}: {state.name} {state.message}")
            return time.monotonic() - t0
        time.sleep(0.1)


PING = """
import statistics, sys, time, urllib.request
url, n = sys.argv[1], int(sys.argv[2])
times = []
for _ in range(n):
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=10) as r:
        r.read()
    times.append(time.perf_counter() - t0)
print(statistics.median(times) * 1000)
"""


def api_roundtrip_ms(mh: MultiHost, n: int = 200) -> dict[str, float]:
    """Median GET /api/health from inside namespace `core` (through its veth and the
    relay) and from this host (loopback): the per-request cost of being elsewhere."""
    from labkeeper import process

    assert mh.server is not None
    port, ns = mh.server.port, mh.hosts["core"]
    out = {}
    for label, prefix, host in (("other host (netns core)", ("ip", "netns", "exec", ns.name),
                                 mh.shared_ip), ("same host", (), "127.0.0.1")):
        res = process.run((*prefix, sys.executable, "-c", PING,
                           f"http://{host}:{port}/api/health", str(n)), timeout=300)
        out[label] = float(res.stdout.strip())
    return out


def fill_history(mh: MultiHost, runs: int, tasks: int) -> float:
    """``runs`` completed flow runs of the doctor flow over the last 7 days, each with
    ``tasks`` completed task runs and 5 log lines, through the API, 16 at a time."""

    async def go(client: Any) -> None:
        dep = await client.read_deployment_by_name("doctor/doctor")
        now = datetime.now(UTC)
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            start = now - timedelta(days=7) + timedelta(seconds=i * 7 * 86400 / runs)
            state = {"type": "COMPLETED", "name": "Completed"}
            async with sem:
                r = await client._client.post("/flow_runs/", json={
                    "flow_id": str(dep.flow_id), "deployment_id": str(dep.id),
                    "name": f"bench-{i:05d}", "parameters": {}, "state": state,
                    "tags": ["labkeeper", "bench"], "work_queue_name": "core"})
                r.raise_for_status()
                fr = UUID(r.json()["id"])
                for t in range(tasks):
                    tr = await client._client.post("/task_runs/", json={
                        "flow_run_id": str(fr), "task_key": f"check-{t}",
                        "dynamic_key": str(t), "name": f"check-{t}-{i}", "state": state})
                    tr.raise_for_status()
                await client._client.post("/logs/", json=[{
                    "name": "prefect.flow_runs", "level": 20, "flow_run_id": str(fr),
                    "message": f"doctor: line {k} of bench run {i}",
                    "timestamp": (start + timedelta(seconds=k)).isoformat()}
                    for k in range(5)])

        await asyncio.gather(*(one(i) for i in range(runs)))

    t0 = time.monotonic()
    if runs:
        mh.client(go)
        spread_over_a_week(mh, runs)
    return time.monotonic() - t0


def spread_over_a_week(mh: MultiHost, runs: int) -> None:
    """The API stamps runs with the time they were created: move them back over the last
    7 days (start, end, 20 s run time; their task runs alike), as a week of nights."""
    pg = mh.lab.postgres
    assert pg is not None
    pg.psql_super(f"""
UPDATE flow_run f SET expected_start_time = x.t, start_time = x.t,
       end_time = x.t + interval '20 seconds', total_run_time = interval '20 seconds',
       next_scheduled_start_time = NULL, state_timestamp = x.t + interval '20 seconds'
  FROM (SELECT id, now() - interval '7 days' * (1 - (row_number() OVER (ORDER BY name))::float
               / {runs}) AS t FROM flow_run WHERE name LIKE 'bench-%') x
 WHERE f.id = x.id;
UPDATE task_run t SET start_time = f.start_time, end_time = f.end_time,
       expected_start_time = f.start_time, state_timestamp = f.end_time
  FROM flow_run f WHERE t.flow_run_id = f.id AND f.name LIKE 'bench-%';
ANALYZE;""", db="prefect", timeout=300)


def list_times(mh: MultiHost) -> dict[str, float]:
    calls = {
        "filter newest 50": ("POST", "/flow_runs/filter",
                             {"limit": 50, "sort": "START_TIME_DESC"}),
        "filter newest 200": ("POST", "/flow_runs/filter",
                              {"limit": 200, "sort": "START_TIME_DESC"}),
        "paginate page 1 (UI runs page)": ("POST", "/flow_runs/paginate",
                                           {"page": 1, "limit": 10, "sort": "START_TIME_DESC"}),
        "count": ("POST", "/flow_runs/count", {}),
    }

    async def go(client: Any) -> dict[str, float]:
        out = {}
        for label, (method, path, body) in calls.items():
            times = []
            for _ in range(10):
                t0 = time.monotonic()
                r = await client._client.request(method, path, json=body)
                r.raise_for_status()
                times.append(time.monotonic() - t0)
            out[label] = statistics.median(times)
        return out

    return mh.client(go)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--tasks", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="multihost-bench-"))
    lab = LocalLab(work / "lab", pvesim=False)
    mh = MultiHost(lab, work / "mh")
    result: dict[str, Any] = {}

    def note(key: str, value: Any) -> None:  # partial results survive a later failure
        result[key] = value
        print(json.dumps({key: value}), file=sys.stderr, flush=True)

    try:
        lab.start()
        mh.start()
        result["setup_s"] = mh.timings
        trigger_to_completed(mh, "site-check/site-check")  # warm both paths once
        trigger_to_completed(mh, "site-check/site-check-here")
        lat: dict[str, list[float]] = {"other host (netns core)": [], "same host": []}
        note("load_average", Path("/proc/loadavg").read_text().split()[:3])
        for _ in range(args.rounds):
            lat["other host (netns core)"].append(
                trigger_to_completed(mh, "site-check/site-check"))
            lat["same host"].append(trigger_to_completed(mh, "site-check/site-check-here"))
        note("api_roundtrip_median_ms", api_roundtrip_ms(mh))
        note("trigger_to_completed_s", {k: {"median": statistics.median(v), "all": v}
                                        for k, v in lat.items()})
        pid = mh.server.service.pid  # type: ignore[union-attr]
        note("server_rss_mb_before", group_rss_mb(pid))
        note("runs_list_s_before", list_times(mh))
        note("fill_s", fill_history(mh, args.runs, args.tasks))
        note("runs_list_s_after", list_times(mh))
        note("server_rss_mb_after", group_rss_mb(pid))
        result["history"] = {"flow_runs": args.runs, "task_runs": args.runs * args.tasks,
                             "logs": args.runs * 5}
        pg = lab.postgres
        assert pg is not None
        result["prefect_db_size"] = pg.psql_super(
            "SELECT pg_size_pretty(pg_database_size('prefect'));").strip()
    finally:
        mh.stop()
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
