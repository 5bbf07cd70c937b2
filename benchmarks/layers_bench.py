"""Where a backup's cost over the bare pipeline comes from, layer by layer, in one run
(issue 24).

Run: .venv/bin/python benchmarks/layers_bench.py [--scale 100] [--repeat 5]

Reuses run_cost_bench.py's scaffolding (LocalLab, a pgbench database with random filler,
a running Prefect server). Per repetition, order rotating, each path once:

- *bare*: ``bash -o pipefail -c 'pg_dump | restic backup --stdin'``;
- *core*: ``labkeeper.pg_backup.backup_database`` called in this (warm) process: the
  proof's count, the manifest and its restic, no Prefect;
- *core, no count*: the same with the proof's count stubbed out (measurement only:
  what the count costs; the manifest is then stored with no tables);
- *flow*: the ``pg_backup`` flow called in this process against the running server
  (the run's bookkeeping, its tasks, the globals check, the report);
- *runner*: ``labkeeper backup run --db bench`` through a warm runner (the CLI's path).

Each layer's extra is the difference of medians to the layer below; ratios are to the
bare run of the same repetition, medians (min-max).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_cost_bench import Bench, prepared, spread

from labkeeper import pg_backup, pg_client, postgres
from labkeeper.inventory import load_inventory


def _core(inv_path: Path, *, count: bool) -> Callable[[], float]:
    inv = load_inventory(inv_path)
    real_count = postgres.count_rows

    def run() -> float:
        if not count:
            postgres.count_rows = lambda session: ()
        try:
            started = time.monotonic()
            with pg_client.majors_remembered():
                pg_backup.backup_database(inv, "bench")
            return time.monotonic() - started
        finally:
            postgres.count_rows = real_count
    return run


def _flow(inv_path: Path) -> Callable[[], float]:
    from flows.pg_backup import pg_backup_flow

    def run() -> float:
        started = time.monotonic()
        pg_backup_flow(lab=str(inv_path), databases=["bench"])
        return time.monotonic() - started
    return run


def _runner(b: Bench) -> Callable[[], float]:
    env = b.warm_runner()
    return lambda: b.ours(env, b.inv_one)[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    args.small = 1
    with prepared("lk-layersbench-", args) as b:
        for key in ("PREFECT_API_URL", "PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED"):
            os.environ[key] = b.env_server[key]  # the in-process flow's server
        paths: dict[str, Callable[[], float]] = {
            "bare": b.bare, "core, no count": _core(b.inv_one, count=False),
            "core": _core(b.inv_one, count=True), "flow": _flow(b.inv_one),
            "runner": _runner(b)}
        for fn in paths.values():
            fn()
        print("warm-up done (one run of each)", flush=True)
        names = list(paths)
        for i in range(args.repeat):
            shift = i % len(names)
            for name in names[shift:] + names[:shift]:
                b.add(name, paths[name]())
        _report(b.results, names)


def _report(r: dict[str, list[float]], names: list[str]) -> None:
    print(f"\nload average now {os.getloadavg()[0]:.1f}; medians (min-max), s")
    for name in names:
        print(f"  {name:16} {spread(r[name])}")
    print("ratio to bare (same repetition), and the layer's extra over the one below:")
    below = "bare"
    for name in names[1:]:
        ratios = [o / x for o, x in zip(r[name], r["bare"], strict=True)]
        extra = statistics.median(r[name]) - statistics.median(r[below])
        print(f"  {name:16} {statistics.median(ratios):.3f}x ({min(ratios):.2f}-"
              f"{max(ratios):.2f})   {extra:+.2f} s over {below}")
        below = name


if __name__ == "__main__":
    main()
