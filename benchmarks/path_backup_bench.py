"""path_backup benchmark: the flow (restic over SSH on the host) vs the same restic
command run directly on the host.

Run: .venv/bin/python benchmarks/path_backup_bench.py [--mb 120] [--reps 2]

Starts its own LocalLab (moto S3 + sshd; the sshd is root on this machine, so "the
host" is this machine). Each repetition generates a *fresh* tree (new random data,
so every backup uploads everything: no dedup flattery) at one fixed path, then
backs it up either

- **direct**: ``restic --compression auto backup --json --host … --tag … -- TREE``
  run as a local child process with the repository's environment (what an admin
  would type on the host), or
- **flow**: ``path_backup_flow`` (Prefect flow run + task: restic version check over
  SSH, lock listing, ``restic backup --json`` over SSH with secrets on stdin and
  progress parsed, snapshot verification),

alternating the order, into the same repository on the same S3 server. Reports MB/s
of each and the ratio flow/direct, for the whole flow run and for its restic step
alone (``restic s`` in the artifact row).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkeeper import path_backup  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import LocalLab  # noqa: E402


def make_tree(root: Path, total_mb: int) -> int:
    """~20% of the bytes in 2000 small files, the rest in 4 large ones (random data)."""
    root.mkdir(parents=True)
    small_total = total_mb * (1 << 20) // 5
    n_small = 2000
    size = max(1, small_total // n_small)
    total = 0
    for d in range(20):
        sub = root / f"dir{d:02d}"
        sub.mkdir()
        for i in range(n_small // 20):
            (sub / f"f{i:04d}").write_bytes(os.urandom(size))
            total += size
    big = (total_mb * (1 << 20) - total) // 4
    for i in range(4):
        (root / f"big{i}.bin").write_bytes(os.urandom(big))
        total += big
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=120)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lk-pathbench-"))
    os.environ.setdefault("PREFECT_HOME", str(work / "prefect"))
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.path_backup import path_backup_flow

    tree = work / "src" / "current"
    tree.parent.mkdir(parents=True)
    try:
        with LocalLab(work / "lab", postgres=False, pvesim=False) as lab, \
                temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), \
                prefect_test_harness(server_startup_timeout=120):
            inv = yaml.safe_load(lab.inventory_path.read_text())
            inv["path_backups"] = [{"name": "bench", "host": "labhost", "paths": [str(tree)],
                                    "progress_interval": 30}]
            inv_path = work / "lab.yaml"
            inv_path.write_text(yaml.safe_dump(inv, sort_keys=False))
            loaded = load_inventory(inv_path)
            pb = loaded.path_backup("bench")
            repo = path_backup.open_repo(loaded, pb)
            env = {**os.environ, **path_backup.remote_env(repo, progress_interval=30)}
            direct_argv = path_backup.backup_argv(
                pb, repo, lab=loaded.lab.name,
                tags=[*path_backup.series_tags("direct", "bench"), "backup:direct"])
            results: dict[str, list[tuple[int, float, float]]] = {"direct": [], "flow": []}
            for rep in range(args.reps):
                order = ("direct", "flow") if rep % 2 == 0 else ("flow", "direct")
                for kind in order:
                    if tree.exists():
                        shutil.rmtree(tree)
                    nbytes = make_tree(tree, args.mb)
                    subprocess.run(("sync",), check=False)
                    t0 = time.monotonic()
                    if kind == "direct":
                        subprocess.run(direct_argv, env=env, check=True,
                                       stdout=subprocess.DEVNULL, timeout=3600)
                        wall = time.monotonic() - t0
                        step = wall
                    else:
                        rows = path_backup_flow(lab=str(inv_path), names=["bench"])
                        wall = time.monotonic() - t0
                        step = float(rows[0]["restic s"])
                    results[kind].append((nbytes, wall, step))
                    print(f"rep {rep} {kind:6s}: {nbytes / 1e6:7.1f} MB in {wall:6.2f} s "
                          f"({nbytes / 1e6 / wall:6.1f} MB/s; restic step {step:6.2f} s)",
                          flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def rate(kind: str, idx: int) -> float:
        rows = results[kind]
        return sum(r[0] for r in rows) / 1e6 / sum(r[idx] for r in rows)

    d, f, fs = rate("direct", 1), rate("flow", 1), rate("flow", 2)
    print(f"\ndirect restic on the host : {d:6.1f} MB/s")
    print(f"path_backup flow (whole)  : {f:6.1f} MB/s  ratio {f / d:.2f}")
    print(f"flow's restic-over-SSH step: {fs:6.1f} MB/s  ratio {fs / d:.2f}")


if __name__ == "__main__":
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: the lab's processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
