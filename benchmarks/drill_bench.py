"""DR drill benchmark: the drill's streamed restore vs the bare shell pipeline.

Run: .venv/bin/python benchmarks/drill_bench.py [--rows 2000000] [--rounds 2]

Starts its own LocalLab (PostgreSQL + moto S3), builds a few-hundred-MB database as
the lab's `labkeeper` role (generate_series), backs it up with
`labkeeper.pg_backup.backup_database`, then restores *the same snapshot*, rounds
interleaved, with:

1. bare: `bash -o pipefail -c 'restic dump --no-lock SNAP /db.sql | psql -X -q -d X'`
   into an empty database;
2. drill restore: `labkeeper.drill.stream_restore` (the drill's pipeline: restic dump
   with the dump-complete gate → psql, run by `labkeeper.process.pipeline`) into an
   empty database;

and once the whole `labkeeper.drill.database_drill` (create, restore, exact row
counts, smoke query, globals check, drop) for the RTO a person would see.
Speed = dump bytes / wall seconds; the goal is drill >= 0.9x bare.
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
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkeeper import drill, pg_backup, postgres  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import LocalLab  # noqa: E402

DB = "drillbench"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="drill-bench-"))
    lab = LocalLab(work, sshd=False, pvesim=False)
    try:
        lab.start()
        bench(lab, work, args.rows, args.rounds)
    finally:
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench(lab: LocalLab, work: Path, rows: int, rounds: int) -> None:
    pg = lab.postgres
    assert pg is not None
    t0 = time.monotonic()
    pg.psql_super(f"CREATE DATABASE {DB} OWNER {pg.app_user};")
    pg.psql_super(
        f"SET ROLE {pg.app_user};\n"
        "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, "
        "kind int NOT NULL, payload text NOT NULL);\n"
        "INSERT INTO events SELECT i, timestamptz '2024-01-01' + i * interval '1 second', "
        "i % 17, md5(i::text) || md5((i * 7)::text) || md5((i * 13)::text) "
        f"FROM generate_series(1, {rows}) i;\n"
        "CREATE TABLE users (id int PRIMARY KEY, name text);\n"
        "INSERT INTO users SELECT i, 'u' || i FROM generate_series(1, 1000) i;\n",
        db=DB, timeout=900)
    print(f"built {DB} ({rows} rows) in {time.monotonic() - t0:.1f} s")
    inv_data = yaml.safe_load(lab.inventory_path.read_text())
    base = inv_data["databases"][0]
    inv_data["databases"].append({
        **base, "name": DB, "dbname": DB,
        "drill": {"server": "lab-pg", "rto_minutes": 30, "rpo_hours": 26,
                  "smoke_queries": [{"sql": "SELECT count(*) FROM users", "min": 1}]}})
    inv_data["drills"] = {"servers": [{"name": "lab-pg", "host": pg.host, "port": pg.port,
                                       "user": pg.app_user, "password": base["password"]}]}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(inv_data, sort_keys=False))
    inv = load_inventory(path)
    db = inv.database(DB)
    pg_backup.backup_globals(inv, pg_backup.server_label(inv, db), [DB])
    t0 = time.monotonic()
    res = pg_backup.backup_database(inv, DB)
    size = res.bytes_dumped
    print(f"backup: {size / 1e6:.1f} MB plain dump in {time.monotonic() - t0:.1f} s, "
          f"snapshot {res.snapshot_id[:8]}")
    repo = pg_backup.open_repo(inv, inv.repository_for(db).name)
    server = inv.drill_server("lab-pg")
    admin = drill.drill_conn(inv, server)
    env = {**os.environ, **repo.env(), **admin.env()}
    bare_times: list[float] = []
    drill_times: list[float] = []
    for r in range(rounds):
        for kind in ("bare", "drill"):
            name = drill.scratch_db_name(f"bench_{kind}")
            postgres.query(admin, drill.create_db_sql(name), timeout=60)
            conn = drill.drill_conn(inv, server, dbname=name)
            try:
                if kind == "bare":
                    dump = " ".join(repo.base_argv()) + \
                        f" dump --no-lock {res.snapshot_id} /{DB}.sql"
                    psql = " ".join(("psql", "-X", "-q", *conn.conn_args()))
                    t0 = time.monotonic()
                    subprocess.run(("bash", "-o", "pipefail", "-c",
                                    f"{dump} | {psql} >/dev/null"), env=env, check=True)
                    bare_times.append(time.monotonic() - t0)
                else:
                    t0 = time.monotonic()
                    out = drill.stream_restore(repo, res.snapshot_id, f"/{DB}.sql", conn,
                                               timeout=1800)
                    drill_times.append(time.monotonic() - t0)
                    assert out.bytes == size and not out.unexpected_errors, out
            finally:
                postgres.query(admin, drill.drop_db_sql(name), timeout=120)
            t = (bare_times if kind == "bare" else drill_times)[-1]
            print(f"round {r + 1} {kind:5}: {t:6.2f} s  {size / 1e6 / t:6.1f} MB/s")
    full = drill.database_drill(inv, DB)
    assert full.passed, full.summary()
    bare_m, drill_m = statistics.median(bare_times), statistics.median(drill_times)
    print()
    print(f"dump size                     {size / 1e6:8.1f} MB")
    print(f"bare restic dump | psql       {bare_m:8.2f} s  {size / 1e6 / bare_m:6.1f} MB/s "
          f"(median of {len(bare_times)})")
    print(f"drill stream_restore          {drill_m:8.2f} s  {size / 1e6 / drill_m:6.1f} MB/s "
          f"(median of {len(drill_times)})")
    print(f"speed ratio drill / bare      {bare_m / drill_m:8.2f}x  (goal >= 0.9x)")
    print(f"whole database drill (RTO)    {full.rto_s:8.2f} s  (restore + {len(full.checks)} "
          f"checks; total with find/manifest/drop {full.duration_s:.2f} s)")


if __name__ == "__main__":
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C: the lab's processes are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
