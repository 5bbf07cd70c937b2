"""pg_backup benchmark: the flow's backup vs the bare shell pipeline, dedup, temp files.

Run: .venv/bin/python benchmarks/pg_backup_bench.py [--scale 30]

Starts its own LocalLab (PostgreSQL + moto S3), builds a pgbench database as the
lab's `labkeeper` role, then measures, each in a fresh child process:

1. wall time and peak RSS (largest process of the tree, from wait4) of
   `bash -o pipefail -c 'pg_dump | restic backup --stdin'` and of
   `labkeeper.pg_backup.backup_database` (manifest + stream + verify + manifest
   snapshot), each into its own empty repository, cold; then again warm (no change);
2. bytes added to the repository (bucket growth, measured with list_objects:
   restic 0.14's data_added is uncompressed) by our backup after no change and
   after ~1% clustered churn, vs the size of a naive `pg_dump | gzip`;
3. bytes that appeared in TMPDIR (and /tmp) during our backup (should be 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkeeper import b2, pg_backup, restic  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import LocalLab  # noqa: E402


def run_measured(argv, env, watch: list[Path] | None = None):
    """Run argv; return (wall seconds, peak RSS MB of the tree, max bytes seen in watch)."""
    peak_tmp = [0]
    stop = threading.Event()

    def watcher():
        while not stop.is_set():
            total = 0
            for d in watch or []:
                for p in d.rglob("*"):
                    try:
                        if p.is_file():
                            total += p.stat().st_size
                    except OSError:
                        pass
            peak_tmp[0] = max(peak_tmp[0], total)
            time.sleep(0.05)

    t = threading.Thread(target=watcher, daemon=True)
    t.start()
    started = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    stop.set()
    t.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed: {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, peak_tmp[0], out


def bucket_bytes(target, prefix: str) -> int:
    return b2.bucket_usage(target, prefix=prefix)[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=30)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lk-bench-"))
    print(f"workdir {work}", flush=True)
    lab = LocalLab(work, sshd=False, pvesim=False)
    lab.start()
    try:
        bench(lab, work, args.scale)
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench(lab: LocalLab, work: Path, scale: int) -> None:
    pg = lab.postgres
    pw = pg.password_file.read_text().strip()
    pg.psql_super(f"CREATE DATABASE bench OWNER {pg.app_user};")
    env_pg = {**os.environ, "PGPASSWORD": pw}
    t0 = time.monotonic()
    subprocess.run(["pgbench", "-i", "-q", "-s", str(scale), "-h", pg.host, "-p", str(pg.port),
                    "-U", pg.app_user, "bench"], env=env_pg, check=True,
                   capture_output=True)
    # pgbench's filler is blank (compresses ~35x); random filler like real rows
    subprocess.run(["psql", "-X", "-q", "-h", pg.host, "-p", str(pg.port), "-U", pg.app_user,
                    "-d", "bench", "-c",
                    "UPDATE pgbench_accounts SET filler = md5(aid::text) || md5((aid * 7)::text)"
                    " || left(md5((aid * 13)::text), 20)", "-c", "VACUUM pgbench_accounts"],
                   env=env_pg, check=True, capture_output=True)
    print(f"pgbench -i -s {scale} + random filler: {time.monotonic() - t0:.1f} s", flush=True)

    inv = yaml.safe_load(lab.inventory_path.read_text())
    base = inv["repositories"][0]
    root = base["url"].rsplit("/", 1)[0]
    inv["repositories"] = [
        {**base, "name": "bare", "url": f"{root}/bare", "cache_dir": str(work / "cache-bare")},
        {**base, "name": "ours", "url": f"{root}/ours", "cache_dir": str(work / "cache-ours")},
    ]
    inv["databases"] = [{**inv["databases"][0], "name": "bench", "dbname": "bench",
                         "repository": "ours", "globals": False}]
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(inv))
    loaded = load_inventory(path)
    repos = {n: pg_backup.open_repo(loaded, n) for n in ("bare", "ours")}
    for r in repos.values():
        restic.init(r)
    target = lab.s3.target()

    bare_env = {**os.environ, **repos["bare"].env(), "PGPASSWORD": pw}
    bare_cmd = ["bash", "-o", "pipefail", "-c",
                f"pg_dump -Fp -h {pg.host} -p {pg.port} -U {pg.app_user} bench | "
                "restic --compression auto backup --stdin --stdin-filename bench.sql "
                "--host local-lab --tag bare --json > /dev/null"]
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    ours_env = {**os.environ, "TMPDIR": str(tmpdir)}
    ours_cmd = [sys.executable, "-c",
                f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                "from labkeeper import pg_backup\n"
                "from labkeeper.inventory import load_inventory\n"
                f"r = pg_backup.backup_database(load_inventory({str(path)!r}), 'bench',\n"
                "                              log=lambda m: None)\n"
                "print(r.duration_s, r.stream_s)\n"]
    stream_cmd = [sys.executable, "-c",
                  f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
                  "from labkeeper import pg_backup, postgres, process, restic\n"
                  "from labkeeper.inventory import load_inventory\n"
                  f"inv = load_inventory({str(path)!r}); db = inv.database('bench')\n"
                  "repo = pg_backup.open_repo(inv, 'bare'); conn = pg_backup.conn_for(inv, db)\n"
                  "t = time.monotonic()\n"
                  "restic.stream_backup(repo, process.Stage(postgres.pg_dump_argv(conn), "
                  "codes=postgres.PG_DUMP_CODES, env=conn.env()), filename='bench.sql', "
                  "host='local-lab', tags=['relay'], gate=postgres.plain_dump_complete, "
                  "timeout=3600); print(time.monotonic() - t, time.monotonic() - t)\n"]

    size_gz = int(subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"pg_dump -Fp -h {pg.host} -p {pg.port} -U {pg.app_user} bench | gzip | wc -c"],
        env=env_pg, check=True, capture_output=True, text=True).stdout)
    plain = int(subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"pg_dump -Fp -h {pg.host} -p {pg.port} -U {pg.app_user} bench | wc -c"],
        env=env_pg, check=True, capture_output=True, text=True).stdout)

    res = {}
    b0 = bucket_bytes(target, "ours/")
    res["bare cold"] = run_measured(bare_cmd, bare_env)
    free0 = shutil.disk_usage(work).free
    res["ours cold"] = run_measured(ours_cmd, ours_env, [tmpdir])
    free_delta = free0 - shutil.disk_usage(work).free
    b1 = bucket_bytes(target, "ours/")
    res["bare warm"] = run_measured(bare_cmd, bare_env)
    res["relay only warm"] = run_measured(stream_cmd, os.environ.copy())
    res["ours warm (no change)"] = run_measured(ours_cmd, ours_env, [tmpdir])
    b2_ = bucket_bytes(target, "ours/")
    n_churn = max(1, scale * 100_000 // 100)
    subprocess.run(["psql", "-X", "-q", "-h", pg.host, "-p", str(pg.port), "-U", pg.app_user,
                    "-d", "bench", "-c",
                    f"UPDATE pgbench_accounts SET abalance = abalance + 1, filler = md5(aid::text)"
                    f" WHERE aid <= {n_churn}"], env=env_pg, check=True, capture_output=True)
    res["ours after 1% churn"] = run_measured(ours_cmd, ours_env, [tmpdir])
    b3 = bucket_bytes(target, "ours/")

    print()
    print(f"plain dump {plain / 1e6:.1f} MB; naive pg_dump | gzip {size_gz / 1e6:.1f} MB")
    print("wall = the whole child process (python start-up and imports included);")
    print("call = our function alone; stream = the pg_dump -> restic relay alone")
    print(f"{'run':24} {'wall s':>7} {'call s':>7} {'stream s':>8} {'stream MB/s':>11} "
          f"{'peak RSS MB':>11} {'tmp bytes':>9}")
    timing = {}
    for k, (wall, rss, tmp, out) in res.items():
        call, stream = (float(x) for x in out.split()) if out.strip() else (wall, wall)
        timing[k] = stream
        print(f"{k:24} {wall:7.2f} {call:7.2f} {stream:8.2f} {plain / 1e6 / stream:11.1f} "
              f"{rss:11.1f} {tmp:9d}")
    print(f"free space used on the work filesystem during our cold backup: "
          f"{free_delta / 1e6:.1f} MB (restic's cache dir lives there)")
    print("throughput ratio vs the bare pipeline (its wall time / ours):")
    for k in ("ours cold", "ours warm (no change)", "relay only warm"):
        bare = res["bare cold" if "cold" in k else "bare warm"][0]
        print(f"  {k:24} whole child {bare / res[k][0]:.2f}x, "
              f"stream alone {bare / timing[k]:.2f}x")
    print(f"repository growth (bucket): first {(b1 - b0) / 1e6:.2f} MB, no change "
          f"{(b2_ - b1) / 1e6:.2f} MB, after 1% clustered churn ({n_churn} rows) "
          f"{(b3 - b2_) / 1e6:.2f} MB = {(b3 - b2_) / size_gz * 100:.1f}% of the gzip dump")


if __name__ == "__main__":
    main()
