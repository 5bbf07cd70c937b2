"""pg_backup benchmark: the flow's backup vs the bare shell pipeline, dedup, temp files.

Run: .venv/bin/python benchmarks/pg_backup_bench.py [--scale 30] [--repeat 5] [--cold-repeat 3]

Starts its own LocalLab (PostgreSQL + moto S3), builds a pgbench database as the
lab's `labkeeper` role, then measures, each in a fresh child process:

1. wall time and peak RSS (largest process of the tree, from wait4) of
   `bash -o pipefail -c 'pg_dump | restic backup --stdin'` and of
   `labkeeper.pg_backup.backup_database` (snapshot, stream with the row counts
   alongside, proof from restic's summary, manifest snapshot), each into its own
   empty repository, cold (``--cold-repeat`` pairs, new repositories each); then
   warm, no change (``--repeat`` triples with the relay alone); medians and ranges,
   ratios per pair run back to back (the machine is shared: expect noise). Before
   the timed runs: VACUUM ANALYZE, CHECKPOINT and one untimed cold pair (the first
   runs after set-up were slower whichever kind ran them);
2. bytes added to the repository (bucket growth, measured with list_objects:
   restic 0.14's data_added is uncompressed) by our backup after no change and
   after ~1% clustered churn, vs the size of a naive `pg_dump | gzip`;
3. bytes that appeared in TMPDIR (and /tmp) during our backup (should be 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
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


def spread(xs: list[float]) -> str:
    """median (min-max) of a list of numbers."""
    return f"{statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=5,
                    help="warm runs of each kind (medians are reported)")
    ap.add_argument("--cold-repeat", type=int, default=3,
                    help="cold runs of each kind, each into new empty repositories")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lk-bench-"))
    print(f"workdir {work}", flush=True)
    lab = LocalLab(work, sshd=False, pvesim=False)
    try:
        lab.start()
        bench(lab, work, args.scale, args.repeat, args.cold_repeat)
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench(lab: LocalLab, work: Path, scale: int, repeat: int, cold_repeat: int) -> None:
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
    names = [f"{kind}-c{i}" for i in range(cold_repeat + 1) for kind in ("bare", "ours")]
    inv["repositories"] = [{**base, "name": n, "url": f"{root}/{n}",
                            "cache_dir": str(work / f"cache-{n}")} for n in names]
    paths = []
    for i in range(cold_repeat + 1):  # the last one: the untimed warm-up pair
        inv["databases"] = [{**inv["databases"][0], "name": "bench", "dbname": "bench",
                             "repository": f"ours-c{i}", "globals": False}]
        paths.append(work / f"bench-c{i}.yaml")
        paths[-1].write_text(yaml.safe_dump(inv))
    loaded = load_inventory(paths[0])
    repos = {n: pg_backup.open_repo(loaded, n) for n in names}
    for r in repos.values():
        restic.init(r)
    target = lab.s3.target()

    def bare_cmd(i: int) -> tuple[list[str], dict[str, str]]:
        env = {**os.environ, **repos[f"bare-c{i}"].env(), "PGPASSWORD": pw}
        return (["bash", "-o", "pipefail", "-c",
                 f"pg_dump -Fp -h {pg.host} -p {pg.port} -U {pg.app_user} bench | "
                 "restic --compression auto backup --stdin --stdin-filename bench.sql "
                 "--host local-lab --tag bare --json > /dev/null"], env)

    tmpdir = work / "tmp"
    tmpdir.mkdir()
    ours_env = {**os.environ, "TMPDIR": str(tmpdir)}

    def ours_cmd(i: int) -> list[str]:
        return [sys.executable, "-c",
                f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                "from labkeeper import pg_backup\n"
                "from labkeeper.inventory import load_inventory\n"
                f"r = pg_backup.backup_database(load_inventory({str(paths[i])!r}), 'bench')\n"
                "print(r.duration_s, r.stream_s)\n"]

    stream_cmd = [sys.executable, "-c",
                  f"import sys, time; sys.path.insert(0, {str(ROOT)!r})\n"
                  "from labkeeper import pg_backup, postgres, process, restic\n"
                  "from labkeeper.inventory import load_inventory\n"
                  f"inv = load_inventory({str(paths[0])!r}); db = inv.database('bench')\n"
                  "repo = pg_backup.open_repo(inv, 'bare-c0')\n"
                  "conn = pg_backup.conn_for(inv, db)\n"
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

    # (wall, call, stream, rss, tmp) per run; pairs of (bare, ours) run back to back.
    runs: dict[str, list[tuple[float, float, float, float, int]]] = {}

    def record(key: str, measured) -> tuple[float, float, float, float, int]:
        wall, rss, tmp, out = measured
        call, stream = (float(x) for x in out.split()) if out.strip() else (wall, wall)
        row = (wall, call, stream, rss, tmp)
        runs.setdefault(key, []).append(row)
        return row

    def show(key: str, row) -> None:
        print(f"  {key:22} wall {row[0]:6.2f}  call {row[1]:6.2f}  stream {row[2]:6.2f}",
              flush=True)

    # Settle: write out what the set-up dirtied, then one untimed cold pair (the first
    # runs after set-up were measured slower whichever kind ran them).
    pg.psql_super("VACUUM (ANALYZE);", db="bench", timeout=600)
    pg.psql_super("CHECKPOINT;", timeout=600)
    warm_up = cold_repeat
    run_measured(bare_cmd(warm_up)[0], bare_cmd(warm_up)[1])
    run_measured(ours_cmd(warm_up), ours_env)
    free_delta = 0
    growth_first = 0
    for i in range(cold_repeat):  # each into its own empty repositories; order alternates
        order = ("bare", "ours") if i % 2 == 0 else ("ours", "bare")
        for kind in order:
            if kind == "bare":
                argv, env = bare_cmd(i)
                show("bare cold", record("bare cold", run_measured(argv, env)))
                continue
            b0 = bucket_bytes(target, f"ours-c{i}/")
            free0 = shutil.disk_usage(work).free
            show("ours cold", record("ours cold", run_measured(ours_cmd(i), ours_env,
                                                               [tmpdir])))
            if i == 0:
                free_delta = free0 - shutil.disk_usage(work).free
                growth_first = bucket_bytes(target, "ours-c0/") - b0
    b1 = bucket_bytes(target, "ours-c0/")
    for i in range(repeat):  # warm: into the first cold run's repositories, no change
        order = ["bare", "relay", "ours"]
        order = order[i % 3:] + order[:i % 3]
        for kind in order:
            if kind == "bare":
                argv, env = bare_cmd(0)
                show("bare warm", record("bare warm", run_measured(argv, env)))
            elif kind == "relay":
                show("relay only warm", record("relay only warm",
                                               run_measured(stream_cmd, os.environ.copy())))
            else:
                show("ours warm", record("ours warm", run_measured(ours_cmd(0), ours_env,
                                                                   [tmpdir])))
    b2_ = bucket_bytes(target, "ours-c0/")
    n_churn = max(1, scale * 100_000 // 100)
    subprocess.run(["psql", "-X", "-q", "-h", pg.host, "-p", str(pg.port), "-U", pg.app_user,
                    "-d", "bench", "-c",
                    f"UPDATE pgbench_accounts SET abalance = abalance + 1, filler = md5(aid::text)"
                    f" WHERE aid <= {n_churn}"], env=env_pg, check=True, capture_output=True)
    show("ours after 1% churn", record("ours after 1% churn",
                                       run_measured(ours_cmd(0), ours_env, [tmpdir])))
    b3 = bucket_bytes(target, "ours-c0/")

    print()
    print(f"plain dump {plain / 1e6:.1f} MB; naive pg_dump | gzip {size_gz / 1e6:.1f} MB; "
          f"load average now {os.getloadavg()[0]:.1f} (2 cores)")
    print("wall = the whole child process (python start-up and imports included);")
    print("call = our function alone; stream = the pg_dump -> restic relay alone")
    print("each: median (min-max) over the runs")
    print(f"{'run':20} {'n':>2} {'wall s':>20} {'call s':>20} {'stream s':>20} "
          f"{'peak RSS MB':>11} {'tmp bytes':>9}")
    for k, rows in runs.items():
        cols = [spread([r[j] for r in rows]) for j in range(3)]
        print(f"{k:20} {len(rows):2d} {cols[0]:>20} {cols[1]:>20} {cols[2]:>20} "
              f"{max(r[3] for r in rows):11.1f} {max(r[4] for r in rows):9d}")
    print(f"free space used on the work filesystem during our first cold backup: "
          f"{free_delta / 1e6:.1f} MB (restic's cache dir lives there)")
    print("throughput ratio vs the bare pipeline run next to it (bare wall / ours), "
          "median (min-max) over the pairs:")
    for k, bare_key in (("ours cold", "bare cold"), ("ours warm", "bare warm"),
                        ("relay only warm", "bare warm")):
        pairs = list(zip(runs[bare_key], runs[k], strict=True))
        print(f"  {k:18} whole child {spread([b[0] / o[0] for b, o in pairs])}x  "
              f"call {spread([b[0] / o[1] for b, o in pairs])}x  "
              f"stream alone {spread([b[0] / o[2] for b, o in pairs])}x")
    print("seconds ours takes longer than the bare pipeline run next to it (a per-database "
          "cost that does not grow with the dump), median (min-max):")
    for k, bare_key in (("ours cold", "bare cold"), ("ours warm", "bare warm")):
        pairs = list(zip(runs[bare_key], runs[k], strict=True))
        print(f"  {k:18} call {spread([o[1] - b[0] for b, o in pairs])} s  "
              f"stream {spread([o[2] - b[0] for b, o in pairs])} s")
    print(f"repository growth (bucket): first {growth_first / 1e6:.2f} MB, no change "
          f"{(b2_ - b1) / repeat / 1e6:.2f} MB per run, after 1% clustered churn "
          f"({n_churn} rows) {(b3 - b2_) / 1e6:.2f} MB = "
          f"{(b3 - b2_) / size_gz * 100:.1f}% of the gzip dump")


if __name__ == "__main__":
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: the lab's processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
