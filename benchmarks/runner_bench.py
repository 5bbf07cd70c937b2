"""A whole `labkeeper backup run` via the warm runner vs in its own process vs the bare
pipeline, in one run (issue 24; cli/runner.py).

Run: .venv/bin/python benchmarks/runner_bench.py [--scale 30] [--repeat 3]

Reuses run_cost_bench.py's scaffolding (LocalLab, a pgbench database with random filler,
a running Prefect server). Per repetition, order rotating: bare ``pg_dump | restic
backup --stdin``; ``labkeeper backup run --db bench`` with ``LABKEEPER_NO_RUNNER=1`` (a
fresh process: imports included); the same through a warm runner started beside it;
and through the runner with ``LABKEEPER_NO_AHEAD=1`` (the dump's restic started by the
backup itself, not ahead of the run: the A/B of labkeeper/pg_backup/ahead.py).
Ratios are to the bare run of the same repetition; medians (min-max).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_cost_bench import prepared, spread


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.small = 1
    with prepared("lk-runnerbench-", args) as b:
        env = b.warm_runner()
        paths = {"bare": b.bare,
                 "in-process": lambda: b.ours({**env, "LABKEEPER_NO_RUNNER": "1"},
                                              b.inv_one)[0],
                 "via the runner": lambda: b.ours(env, b.inv_one)[0],
                 "runner, not ahead": lambda: b.ours({**env, "LABKEEPER_NO_AHEAD": "1"},
                                                     b.inv_one)[0]}
        print("warm-up done (one run of each)", flush=True)
        for fn in paths.values():
            fn()
        names = list(paths)
        for i in range(args.repeat):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                b.add(name, paths[name]())
        r = b.results
        print(f"\nload average now {os.getloadavg()[0]:.1f}; medians (min-max), s")
        for name in names:
            print(f"  {name:16} {spread(r[name])}")
        for name in names[1:]:
            ratios = [o / x for o, x in zip(r[name], r["bare"], strict=True)]
            print(f"  {name:16} / bare: {statistics.median(ratios):.2f}x "
                  f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
