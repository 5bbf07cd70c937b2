"""vzdump orchestration at scale: 60 guests on 3 nodes in a fresh simulator.

Every simulated vzdump takes a fixed ``--duration`` seconds. Reports:

* the flow's makespan vs the ideal schedule (``ceil(guests per node) * duration``,
  one job per node at a time, nodes in parallel): ``flow s`` is the flow run's
  own start-to-end time as Prefect records it, ``wall s`` the whole call,
  including creating the flow run on the API server and tearing it down;
* the same work done by the core library alone, scheduled the same way (a feeder
  thread per node, a node slot held only while the PVE task runs, verification
  and retention after it, no Prefect) — the difference, per guest on a node's
  critical path, is what Prefect adds to the makespan;
* what one Prefect task run costs by itself: a no-op task with the guest task's
  options and arguments, called in a loop inside a flow (ms per task run).

Retention keeps 3 archives per guest, and every run adds one: the first measured
runs prune nothing, later ones (the second ``--poll-max`` value, ``--repeat``) also
prune one archive per guest with a PVE task, which the simulator runs for half the
fixed duration — the last guest's prune then adds about that much to the tail.

Usage: ``.venv/bin/python benchmarks/vzdump_bench.py [--guests 60] [--duration 1.0]
[--poll-max 0.1 5.0] [--repeat 3]`` (starts a temporary Prefect server, ~15 s).
With ``--repeat`` the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # keep the output readable

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkeeper import vzdump as core  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import write_secret  # noqa: E402
from labkeeper.locallab.services import Service  # noqa: E402
from labkeeper.pvesim import Simulator  # noqa: E402
from labkeeper.pvesim.api import add_guest  # noqa: E402
from tasks.vzdump import api_for  # noqa: E402

NODES = ("pve1", "pve2", "pve3")
TOKEN = "labkeeper@pve!bench"


def start_sim(work: Path, guests: int, duration: float, secret: str) -> Simulator:
    """A simulator with ``guests`` LXC guests tagged ``bench``, spread over the nodes."""
    sim = Simulator(nodes=NODES, task_duration=duration, tokens={TOKEN: secret},
                    data_dir=work / "pvesim")
    sim.start(host="127.0.0.1", port=0)
    for i in range(guests):
        add_guest(sim, 1000 + i, "lxc", NODES[i % len(NODES)], config={"tags": "bench"},
                  status="running")
    return sim


def serve_sim(work: Path, guests: int, duration: float) -> None:
    """``--serve-sim WORK``: run the simulator in this process until SIGTERM (the
    benchmark's default: the hypervisor does not share the orchestrator's CPU/GIL)."""
    secret = (work / "secrets" / "pve").read_text().strip()
    sim = start_sim(work, guests, duration, secret)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tmp = work / "sim.json.tmp"
    tmp.write_text(json.dumps({"host": sim.host, "port": sim.port,
                               "ca_file": str(sim.ca_file)}))
    tmp.rename(work / "sim.json")
    try:
        stop.wait()
    finally:
        sim.stop()


class SimProcess:
    """The simulator in a child process (``--serve-sim``), stopped by its PID."""

    def __init__(self, work: Path, guests: int, duration: float) -> None:
        self.service = Service(
            "pvesim", (sys.executable, str(Path(__file__).resolve()), "--serve-sim", str(work),
                       "--guests", str(guests), "--duration", str(duration)),
            log_path=work / "pvesim.log")
        self.service.start()
        deadline = time.monotonic() + 60
        while not (work / "sim.json").exists():
            self.service.check_alive()
            if time.monotonic() > deadline:
                raise SystemExit("the simulator process did not start in 60 s")
            time.sleep(0.05)
        info = json.loads((work / "sim.json").read_text())
        self.host, self.port, self.ca_file = info["host"], info["port"], info["ca_file"]

    def stop(self) -> None:
        self.service.stop()


def make_lab(work: Path, guests: int, duration: float,
             in_process: bool = False) -> tuple[Simulator | SimProcess, Path]:
    secret = secrets.token_hex(16)
    secret_path = write_secret(work / "secrets" / "pve", secret)
    sim: Simulator | SimProcess = (start_sim(work, guests, duration, secret) if in_process
                                   else SimProcess(work, guests, duration))
    inv = {
        "version": 1, "lab": {"name": "bench", "timezone": "UTC"},
        "settings": {"state_dir": str(work / "state")},
        "proxmox": {"host": sim.host, "port": sim.port, "token_id": TOKEN,
                    "token_secret": f"file:{secret_path}", "tls": {"ca_file": str(sim.ca_file)},
                    "nodes": [{"name": n} for n in NODES],
                    "storages": [{"name": "local", "type": "dir",
                                  "content": ["backup", "vztmpl", "iso"]},
                                 {"name": "local-lvm", "type": "lvmthin",
                                  "content": ["images", "rootdir"]}]},
        "vzdump_jobs": [{"name": "bench", "selection": {"tags": ["bench"]},
                         "storage": "local", "retention": {"keep_last": 3},
                         "schedule": "0 0 * * *", "max_per_node": 1}],
    }
    path = work / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return sim, path


def bare_run(lab: Path, poll_max: float) -> float:
    """The same work without Prefect, scheduled like the flow: per node, a feeder
    starts each guest in a thread of its own and moves to the next one as soon as
    that guest holds the node's slot; verification and retention run after the slot
    is released."""
    inv = load_inventory(str(lab))
    job = inv.vzdump_job("bench")
    targets = core.resolve(api_for(inv), inv, job).targets
    errors: list[str] = []
    workers: list[threading.Thread] = []

    def one(t: core.Target, slot: core.NodeSlot) -> None:
        try:
            own = api_for(inv)
            res = core.backup_guest(own, job, t, poll_max=poll_max, slot=slot)
            if res.status not in ("ok", "warning"):
                errors.append(f"{t.vmid}: {res.status}")
                return
            core.apply_retention(own, res.node, job.storage, res.vmid, res.type,  # type: ignore[arg-type]
                                 job.retention)
        except Exception as exc:  # reported below
            errors.append(f"{t.vmid}: {exc}")
        finally:
            slot.give_up()

    def feeder(node: str, queue: list[core.Target]) -> None:
        slots = threading.BoundedSemaphore(job.max_per_node)
        for t in queue:
            slot = core.NodeSlot(node, slots)
            th = threading.Thread(target=one, args=(t, slot))
            th.start()
            workers.append(th)
            slot.handoff.wait()

    started = time.monotonic()
    feeders = [threading.Thread(target=feeder, args=(node, q))
               for node, q in core.node_queues(targets).items()]
    for th in feeders:
        th.start()
    for th in feeders:
        th.join()
    for th in list(workers):
        th.join()
    elapsed = time.monotonic() - started
    if errors:
        raise SystemExit(f"bare run failed: {errors[:5]}")
    return elapsed


def flow_run(lab: Path, poll_max: float) -> tuple[float, float]:
    """(wall seconds of the call, seconds from the flow run's start to its end as Prefect
    recorded them). The difference is the flow run's creation and teardown, which on
    the test harness's SQLite server includes ingesting the previous run's events."""
    from prefect.client.orchestration import get_client

    from flows.vzdump import vzdump_flow

    inv = yaml.safe_load(lab.read_text())  # the poll cap is the inventory's
    inv["settings"]["tuning"] = {"vzdump_poll_max": poll_max}
    lab.write_text(yaml.safe_dump(inv, sort_keys=False))
    started = time.monotonic()
    state = vzdump_flow(job="bench", lab=str(lab), force=True, return_state=True)
    elapsed = time.monotonic() - started
    if not state.is_completed():
        raise SystemExit(f"flow failed: {state.message}")
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert run.start_time is not None and run.end_time is not None
    return elapsed, (run.end_time - run.start_time).total_seconds()


def task_run_cost(lab: Path, n: int = 60) -> float:
    """Seconds one Prefect task run costs: a no-op task with the guest task's options
    and arguments (the inventory, the job, a target), ``n`` times in a flow."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from tasks.common import RETRY

    inv = load_inventory(str(lab))
    job = inv.vzdump_job("bench")
    target = core.Target(1000, "pve1", "lxc", "ct1000")

    @task(name="noop-guest", task_run_name="noop-{target.vmid}", cache_policy=NO_CACHE,
          **RETRY)
    def noop(inv: object, job: object, target: core.Target) -> None:
        return None

    @flow(name="noop-bench")
    def many() -> float:
        started = time.monotonic()
        for _ in range(n):
            noop(inv, job, target)
        return (time.monotonic() - started) / n

    return many()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guests", type=int, default=60)
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--poll-max", type=float, nargs="+", default=[0.1, 5.0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--in-process-sim", action="store_true",
                    help="run the simulator in the benchmark's own process (shares its GIL)")
    ap.add_argument("--serve-sim", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_sim is not None:
        serve_sim(args.serve_sim, args.guests, args.duration)
        return

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    per_node = math.ceil(args.guests / len(NODES))
    ideal = per_node * args.duration
    print(f"{args.guests} guests on {len(NODES)} nodes, vzdump {args.duration:g} s each, "
          f"max 1 per node: ideal makespan {ideal:.1f} s ({per_node} per node); simulator "
          f"{'in this process' if args.in_process_sim else 'in its own process'}", flush=True)
    with tempfile.TemporaryDirectory(prefix="vzbench-") as tmp, \
            temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            prefect_test_harness(server_startup_timeout=120):
        sim, lab = make_lab(Path(tmp), args.guests, args.duration, args.in_process_sim)
        try:
            flow_run(lab, 0.1)  # warm-up: imports, first API connections
            cost = statistics.median(task_run_cost(lab) for _ in range(args.repeat))
            print(f"one Prefect task run (no-op, the guest task's options and arguments): "
                  f"{cost * 1000:.1f} ms", flush=True)
            print(f"{'poll cap':>9} {'bare s':>8} {'flow s':>8} {'flow/ideal':>10} "
                  f"{'bare/ideal':>10} {'prefect ms/guest':>16} {'wall s':>8} {'wall/ideal':>10}",
                  flush=True)
            for poll in args.poll_max:
                bares, flows, walls = [], [], []
                for _ in range(args.repeat):
                    bares.append(bare_run(lab, poll))
                    wall, run = flow_run(lab, poll)
                    flows.append(run)
                    walls.append(wall)
                    if args.repeat > 1:
                        print(f"{'':>9} {bares[-1]:8.2f} {run:8.2f} {run / ideal:10.3f} "
                              f"{bares[-1] / ideal:10.3f} {'':>16} {wall:8.2f} "
                              f"{wall / ideal:10.3f}", flush=True)
                bare, flow = statistics.median(bares), statistics.median(flows)
                wall = statistics.median(walls)
                overhead = (flow - bare) / per_node * 1000
                print(f"{poll:>8g}s {bare:8.2f} {flow:8.2f} {flow / ideal:10.3f} "
                      f"{bare / ideal:10.3f} {overhead:16.0f} {wall:8.2f} {wall / ideal:10.3f}"
                      f"{'  (medians)' if args.repeat > 1 else ''}", flush=True)
        finally:
            sim.stop()


if __name__ == "__main__":
    main()
