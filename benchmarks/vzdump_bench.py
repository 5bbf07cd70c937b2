"""vzdump orchestration at scale: 60 guests on 3 nodes in a fresh simulator.

Every simulated vzdump takes a fixed ``--duration`` seconds. Reports:

* the flow's makespan vs the ideal schedule (``ceil(guests per node) * duration``,
  one job per node at a time, nodes in parallel);
* the same work done by the core library alone (per-node threads calling
  ``labkeeper.vzdump.backup_guest`` and the retention, no Prefect) — the
  difference is the Prefect overhead, shown per guest task.

Usage: ``.venv/bin/python benchmarks/vzdump_bench.py [--guests 60] [--duration 1.0]
[--poll-max 0.1]`` (starts a temporary Prefect server, ~15 s).
"""

from __future__ import annotations

import argparse
import math
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from labkeeper import vzdump as core  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import write_secret  # noqa: E402
from labkeeper.pvesim import Simulator  # noqa: E402
from labkeeper.pvesim.api import add_guest  # noqa: E402
from tasks.vzdump import api_for  # noqa: E402

NODES = ("pve1", "pve2", "pve3")
TOKEN = "labkeeper@pve!bench"


def make_lab(work: Path, guests: int, duration: float) -> tuple[Simulator, Path, list[int]]:
    secret = secrets.token_hex(16)
    secret_path = write_secret(work / "secrets" / "pve", secret)
    sim = Simulator(nodes=NODES, task_duration=duration, tokens={TOKEN: secret},
                    data_dir=work / "pvesim")
    sim.start(host="127.0.0.1", port=0)
    vmids = []
    for i in range(guests):
        vmid = 1000 + i
        add_guest(sim, vmid, "lxc", NODES[i % len(NODES)], config={"tags": "bench"},
                  status="running")
        vmids.append(vmid)
    inv = {
        "version": 1, "lab": {"name": "bench", "timezone": "UTC"},
        "settings": {"state_dir": str(work / "state")},
        "proxmox": {"host": sim.host, "port": sim.port, "token_id": TOKEN,
                    "token_secret": f"file:{secret_path}", "tls": {"ca_file": sim.ca_file},
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
    return sim, path, vmids


def bare_run(lab: Path, poll_max: float) -> float:
    """The same work without Prefect: one thread per node."""
    inv = load_inventory(str(lab))
    job = inv.vzdump_job("bench")
    api = api_for(inv)
    targets = core.resolve(api, inv, job).targets
    errors: list[str] = []

    def node_lane(queue: list[core.Target]) -> None:
        own = api_for(inv)
        for t in queue:
            res = core.backup_guest(own, job, t, poll_max=poll_max)
            if res.status not in ("ok", "warning"):
                errors.append(f"{t.vmid}: {res.status}")
            core.apply_retention(own, res.node, job.storage, res.vmid, res.type,  # type: ignore[arg-type]
                                 job.retention)

    started = time.monotonic()
    threads = [threading.Thread(target=node_lane, args=(q,))
               for q in core.node_queues(targets).values()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    elapsed = time.monotonic() - started
    if errors:
        raise SystemExit(f"bare run failed: {errors[:5]}")
    return elapsed


def flow_run(lab: Path, poll_max: float) -> float:
    from flows.vzdump import vzdump_flow

    started = time.monotonic()
    state = vzdump_flow(job="bench", lab=str(lab), force=True, poll_max=poll_max,
                        return_state=True)
    elapsed = time.monotonic() - started
    if not state.is_completed():
        raise SystemExit(f"flow failed: {state.message}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--guests", type=int, default=60)
    ap.add_argument("--duration", type=float, default=1.0)
    ap.add_argument("--poll-max", type=float, nargs="+", default=[0.1, 5.0])
    args = ap.parse_args()

    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    per_node = math.ceil(args.guests / len(NODES))
    ideal = per_node * args.duration
    print(f"{args.guests} guests on {len(NODES)} nodes, vzdump {args.duration:g} s each, "
          f"max 1 per node: ideal makespan {ideal:.1f} s ({per_node} per node)")
    with tempfile.TemporaryDirectory(prefix="vzbench-") as tmp, \
            temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
            prefect_test_harness(server_startup_timeout=120):
        sim, lab, _ = make_lab(Path(tmp), args.guests, args.duration)
        try:
            flow_run(lab, 0.1)  # warm-up: imports, first API connections
            print(f"{'poll cap':>9} {'bare s':>8} {'flow s':>8} {'flow/ideal':>10} "
                  f"{'bare/ideal':>10} {'prefect ms/guest':>16}")
            for poll in args.poll_max:
                bare = bare_run(lab, poll)
                flow = flow_run(lab, poll)
                overhead = (flow - bare) / per_node * 1000
                print(f"{poll:>8g}s {bare:8.2f} {flow:8.2f} {flow / ideal:10.3f} "
                      f"{bare / ideal:10.3f} {overhead:16.0f}")
        finally:
            sim.stop()


if __name__ == "__main__":
    main()
