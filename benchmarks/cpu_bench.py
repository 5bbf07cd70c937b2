"""Where a backup run's CPU goes, next to the bare pipeline's, and the floor that sets
on this machine's wall time (issue 24).

Run: .venv/bin/python benchmarks/cpu_bench.py [--scale 100] [--repeat 3]

Reuses run_cost_bench.py's scaffolding (LocalLab, a pgbench database with random filler,
a running Prefect server, a warm runner). Per repetition, order alternating: the bare
``pg_dump | restic backup --stdin`` and ``labkeeper backup run --db bench`` through the
runner. During each, every process under the lab's services, the Prefect server, the
runner and this script is sampled from ``/proc`` every 20 ms (its descendants found via
``/proc/<pid>/task/<tid>/children``: no scan of all of ``/proc``) and its CPU time
attributed to a part by its command line. This script's own CPU (the sampling) is left
out. A process that ends between two samples loses at most its last 20 ms.

Printed: the median CPU seconds per part for each run, the total, the wall time, the
cores kept busy, and the floor: on N cores a run cannot end sooner than its CPU / N,
so ``ours CPU / N / bare wall`` is the best ratio this design could reach here with
perfect packing of its work onto the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_cost_bench import prepared

from labkeeper import local_server as ls

TICK = os.sysconf("SC_CLK_TCK")
EVERY = 0.02
PARTS = ("restic: dump", "restic: manifest", "restic: other", "pg_dump", "psql, pg_dumpall",
         "server: COPY backend", "server: other backends", "labkeeper process",
         "Prefect server", "S3 (moto)", "other")


def part_of(cmd: str, titles: set[str]) -> str:
    """The part a process belongs to, by its command line (and, for a PostgreSQL backend,
    every title it showed)."""
    if cmd.startswith("postgres:") or any(t.startswith("postgres:") for t in titles):
        return ("server: COPY backend" if any(" COPY" in t for t in titles)
                else "server: other backends")
    if "restic" in cmd.split(" ", 1)[0] or " restic " in f" {cmd} ":
        if ".manifest.json" in cmd:
            return "restic: manifest"
        return "restic: dump" if " backup " in cmd else "restic: other"
    for needle, part in (("pg_dumpall", "psql, pg_dumpall"), ("pg_dump", "pg_dump"),
                         ("psql", "psql, pg_dumpall"), ("prefect server", "Prefect server"),
                         ("moto_server", "S3 (moto)"), ("cli.main", "labkeeper process")):
        if needle in cmd:
            return part
    return "other"


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    except OSError:
        pass
    return out


def _cpu(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


class Sampler(threading.Thread):
    """CPU time of every process under ``roots`` while it runs (this process excluded)."""

    def __init__(self, roots: list[int]) -> None:
        super().__init__(daemon=True)
        self.roots = roots
        self.stop = threading.Event()
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.cmd: dict[int, str] = {}
        self.titles: dict[int, set[str]] = {}
        self._sample(initial=True)

    def _sample(self, *, initial: bool = False) -> None:
        me = os.getpid()
        todo, seen = list(self.roots), set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo += _children(pid)
            cpu = _cpu(pid)
            if cpu is None or pid == me:
                continue
            if pid not in self.first:  # a process born during the run starts at 0
                self.first[pid] = cpu if initial else 0.0
            self.last[pid] = cpu
            cmd = _cmdline(pid)
            if cmd:
                self.cmd[pid] = cmd
                self.titles.setdefault(pid, set()).add(cmd)

    def run(self) -> None:
        while not self.stop.wait(EVERY):
            self._sample()

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join()
        self._sample()
        parts = dict.fromkeys(PARTS, 0.0)
        for pid, last in self.last.items():
            parts[part_of(self.cmd.get(pid, ""), self.titles.get(pid, set()))] += \
                last - self.first[pid]
        return parts


def measured(fn, roots: list[int]) -> tuple[float, dict[str, float]]:
    sampler = Sampler(roots)
    sampler.start()
    wall = fn()
    time.sleep(0.1)  # what the run's processes still do as it returns
    return wall, sampler.finish()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    args.small = 1
    cores = os.cpu_count() or 1
    with prepared("lk-cpubench-", args) as b:
        env = b.warm_runner()
        runner = int(json.loads(ls.runner_pidfile(b.local).read_text())["pid"])
        assert b.server.service is not None
        roots = [os.getpid(), runner, b.server.service.pid, *b.lab.pids().values()]
        paths = {"bare": b.bare, "ours": lambda: b.ours(env, b.inv_one)[0]}
        b.bare()  # warm-up, untimed
        walls: dict[str, list[float]] = {k: [] for k in paths}
        cpu: dict[str, list[dict[str, float]]] = {k: [] for k in paths}
        for i in range(args.repeat):
            for name in (list(paths) if i % 2 == 0 else list(reversed(paths))):
                wall, parts = measured(paths[name], roots)
                walls[name].append(wall)
                cpu[name].append(parts)
                print(f"  {name:5} wall {wall:5.2f} s, CPU {sum(parts.values()):5.2f} s",
                      flush=True)
        report(walls, cpu, cores)


def report(walls: dict[str, list[float]], cpu: dict[str, list[dict[str, float]]],
           cores: int) -> None:
    med = {k: {p: statistics.median(r[p] for r in rows) for p in PARTS}
           for k, rows in cpu.items()}
    tot = {k: statistics.median(sum(r.values()) for r in rows) for k, rows in cpu.items()}
    wall = {k: statistics.median(v) for k, v in walls.items()}
    print(f"\nmedians of {len(walls['bare'])} repetitions, CPU seconds ({cores} cores)")
    print(f"  {'part':24} {'bare':>6} {'ours':>6} {'extra':>6}")
    for p in PARTS:
        if med["bare"][p] or med["ours"][p]:
            print(f"  {p:24} {med['bare'][p]:6.2f} {med['ours'][p]:6.2f} "
                  f"{med['ours'][p] - med['bare'][p]:+6.2f}")
    print(f"  {'total CPU':24} {tot['bare']:6.2f} {tot['ours']:6.2f} "
          f"{tot['ours'] - tot['bare']:+6.2f}")
    print(f"  {'wall':24} {wall['bare']:6.2f} {wall['ours']:6.2f}   ratio "
          f"{wall['ours'] / wall['bare']:.2f}x")
    print(f"  {'cores busy (CPU/wall)':24} {tot['bare'] / wall['bare']:6.2f} "
          f"{tot['ours'] / wall['ours']:6.2f}")
    floor = tot["ours"] / cores
    print(f"  floor: ours CPU / {cores} cores = {floor:.2f} s = "
          f"{max(floor, wall['bare']) / wall['bare']:.2f}x the bare wall (perfect packing)")


if __name__ == "__main__":
    main()
