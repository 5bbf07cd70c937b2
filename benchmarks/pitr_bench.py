"""PITR benchmark: RPO at a ship interval, bytes per day (WAL + weekly base vs nightly
plain dumps), PITR restore time vs restoring the nightly dump. Same database, same run.

Run: .venv/bin/python benchmarks/pitr_bench.py [--scale 10] [--hours 24]
                                              [--ship-interval 30] [--ships 4]
                                              [--churn scattered|clustered]
                                              [--wal-compression off|pglz|lz4|zstd]

Starts its own PostgreSQL 15 (``full_page_writes`` back ON for realistic WAL) and moto
S3 with two restic repositories (``pitr/`` and ``dumps/`` prefixes of one bucket):

1. ``pgbench -i -s SCALE`` as the ``labkeeper`` role, random ``filler`` text;
2. receiver (slot) started, base backup #1 (its repository growth = a weekly base);
3. a plain dump (``pg_dump -Fp | restic backup --stdin``) into the dumps repository;
4. ``--hours`` simulated hours, each: 1% of ``pgbench_accounts`` updated at scattered
   rows, ``CHECKPOINT`` (one per hour: a *lower* bound on full-page images — a real
   hour with ``checkpoint_timeout = 5min`` has up to 12), ship (switch + upload);
   repository growth = WAL per day;
5. the next night's plain dump (growth = a nightly dump after that churn) and base
   backup #2 (growth = a weekly base after a day of churn);
6. restore time: ``restore pitr --to latest`` (fetch + recovery) vs ``restic dump |
   psql`` of the night's dump into an empty database;
7. RPO: a writer commits a row every 0.2 s while shipping runs every
   ``--ship-interval`` s; for each pair of ships, the worst loss just before ship k+1
   lands is ``landed(k+1) - switched(k)``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import yaml
from pydantic import SecretStr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkeeper import b2, postgres, process, restic  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import LocalLab  # noqa: E402
from labkeeper.locallab.postgres import LocalPostgres  # noqa: E402
from labkeeper.pitr import basebackup, restore, wal  # noqa: E402
from labkeeper.pitr import target as pitr_target  # noqa: E402

DB = "bench"


def growth(lab: LocalLab, prefix: str, fn):
    before = b2.bucket_usage(lab.s3.target(), prefix=prefix)[1]
    t0 = time.monotonic()
    out = fn()
    return out, b2.bucket_usage(lab.s3.target(), prefix=prefix)[1] - before, \
        time.monotonic() - t0


def setup(workdir: Path, scale: int):
    lab = LocalLab(workdir / "lab", postgres=False, s3=True, sshd=False, pvesim=False).start()
    pg = LocalPostgres(workdir / "pg", databases=(DB,))
    pg.start()
    lab.postgres = pg
    pg.psql_super("ALTER ROLE labkeeper REPLICATION;\nALTER SYSTEM SET full_page_writes = on;\n"
                  "SELECT pg_reload_conf();")
    pg.psql_super("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO labkeeper;\n"
                  "CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL);\n"
                  "GRANT ALL ON ticks, ticks_id_seq TO labkeeper;", db=DB)
    pw = pg.password_file.read_text().strip()
    env = {"PGPASSWORD": pw}
    conn = ("-h", pg.host, "-p", str(pg.port), "-U", pg.app_user)
    process.run((str(pg.bindir / "pgbench"), "-i", "-q", "-s", str(scale), *conn, DB),
                timeout=3600, env=env)
    pg.psql_super("UPDATE pgbench_accounts SET filler = md5(aid::text) || md5(random()::text);"
                  "\nVACUUM ANALYZE pgbench_accounts;\nCHECKPOINT;", db=DB, timeout=3600)
    # a second repository for the dumps, in the same bucket
    dumps = restic.Repo(url=lab.repo.url.replace("/restic", "/dumps"), password=SecretStr("d"),
                        aws_access_key_id=lab.repo.aws_access_key_id,
                        aws_secret_access_key=lab.repo.aws_secret_access_key,
                        cache_dir=str(workdir / "cache-dumps"))
    restic.init(dumps)
    data = lab.inventory()
    data["pitr"] = [{"name": "pg1", "database": DB, "spool_dir": str(workdir / "spool")}]
    (workdir / "lab.yaml").write_text(yaml.safe_dump(data))
    inv = load_inventory(workdir / "lab.yaml")
    return lab, pg, dumps, inv, env, conn


def dump_into(dumps: restic.Repo, pg: LocalPostgres, env: dict, conn: tuple) -> None:
    process.pipeline([
        process.Stage((str(pg.bindir / "pg_dump"), "-Fp", *conn, DB), env=env),
        process.Stage(restic.backup_stdin_argv(dumps, filename="bench.sql", host="b",
                                               tags=["nightly"]), env=dumps.env())],
        timeout=3600)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=10)
    ap.add_argument("--hours", type=int, default=24)
    ap.add_argument("--ship-interval", type=float, default=30.0)
    ap.add_argument("--ships", type=int, default=4)
    ap.add_argument("--churn", choices=("scattered", "clustered"), default="scattered")
    ap.add_argument("--wal-compression", choices=("off", "pglz", "lz4", "zstd"), default="off")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pitr-bench-"))
    lab, pg, dumps, inv, env, conn = setup(workdir, args.scale)
    pg.psql_super(f"ALTER SYSTEM SET wal_compression = '{args.wal_compression}';\n"
                  "SELECT pg_reload_conf();")
    t = pitr_target.resolve(inv, "pg1")
    sup = wal.WalReceiver(t)
    th = threading.Thread(target=sup.run, daemon=True)
    th.start()
    try:
        while sup.pid is None:
            time.sleep(0.1)
        size = postgres.query(t.conn, f"SELECT pg_database_size('{DB}')")[0][0]
        print(f"database {DB}: pgbench scale {args.scale}, {int(size) / 1e6:.0f} MB")
        b1, base_bytes, base_s = growth(lab, "restic/",
                                        lambda: basebackup.run_base_backup(t))
        print(f"base backup #1: {b1.bytes / 1e6:.0f} MB stream, +{base_bytes / 1e6:.1f} MB in "
              f"the repository, {base_s:.1f} s")
        _, d1, d1_s = growth(lab, "dumps/", lambda: dump_into(dumps, pg, env, conn))
        print(f"nightly plain dump #1: +{d1 / 1e6:.1f} MB, {d1_s:.1f} s")
        wal_total = 0
        n = int(size) and int(postgres.query(t.conn, "SELECT count(*) FROM pgbench_accounts")[0][0])
        per_hour = max(1, n // 100)
        for h in range(args.hours):
            if args.churn == "scattered":
                rows = (f"aid IN (SELECT (random() * {n - 1})::int + 1 FROM "
                        f"generate_series(1, {per_hour}))")
            else:
                first = (h * per_hour) % max(1, n - per_hour) + 1
                rows = f"aid BETWEEN {first} AND {first + per_hour - 1}"
            pg.psql_super(f"UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE {rows};"
                          "\nCHECKPOINT;", db=DB, timeout=600)
            _, g, _s = growth(lab, "restic/", lambda: wal.ship(t))
            wal_total += g
        print(f"WAL for {args.hours} h of 1% {args.churn} churn per hour (wal_compression "
              f"{args.wal_compression}): "
              f"+{wal_total / 1e6:.1f} MB in the repository")
        _, d2, d2_s = growth(lab, "dumps/", lambda: dump_into(dumps, pg, env, conn))
        print(f"nightly plain dump #2 after that day: +{d2 / 1e6:.1f} MB, {d2_s:.1f} s")
        wal.ship(t)
        before_base2 = datetime.now(tz=UTC)
        _, base2, _ = growth(lab, "restic/",
                             lambda: basebackup.run_base_backup(t))
        print(f"base backup #2 after that day: +{base2 / 1e6:.1f} MB")
        print(f"per day: WAL + weekly base = {(wal_total + base2 / 7) / 1e6:.1f} MB "
              f"(first base/7: {(wal_total + base_bytes / 7) / 1e6:.1f} MB) vs nightly plain "
              f"dump {d2 / 1e6:.1f} MB")
        wal.ship(t)
        # restore times: a day after the weekly base (base #1 + the day's WAL), and
        # right after a base backup (base #2 + the last segments)
        timings = {}
        for label, to in (("day-old base + 24 h WAL",
                           restore.RecoveryTarget("time", time=before_base2)),
                          ("fresh base", restore.RecoveryTarget("latest"))):
            t0 = time.monotonic()
            res = restore.restore_pitr(t, to, workdir / f"restore-{len(timings)}")
            timings[label] = (time.monotonic() - t0, res)
            assert res.cluster is not None
            count = res.cluster.query("SELECT count(*) FROM pgbench_accounts", db=DB)[0][0]
            res.cluster.destroy()
            print(f"restore: PITR {label}: {timings[label][0]:.1f} s (fetch {res.fetch_s:.1f} s,"
                  f" recovery {res.recover_s:.1f} s, {res.wal_segments} segments from "
                  f"{res.wal_batches} snapshots), {count} accounts")
        pg.psql_super("CREATE DATABASE dumprestore;")
        t0 = time.monotonic()
        process.pipeline([
            process.Stage(restic.dump_argv(dumps, "latest", "/bench.sql"), env=dumps.env()),
            process.Stage((str(pg.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                           "-h", str(pg.sockdir), "-p", str(pg.port), "-U", "postgres",
                           "-d", "dumprestore", "-o", "/dev/null"))], timeout=3600)
        dump_s = time.monotonic() - t0
        count = pg.psql_super("SELECT count(*) FROM pgbench_accounts;", db="dumprestore")
        print(f"restore: nightly dump (restic dump | psql into an empty database) {dump_s:.1f} s,"
              f" {count.strip()} accounts")
        rpo(t, args.ship_interval, args.ships)
    finally:
        sup.stop()
        lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def rpo(t: pitr_target.PitrTarget, interval: float, ships: int) -> None:
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            postgres.query(t.conn, "INSERT INTO ticks (at) VALUES (clock_timestamp());")
            stop.wait(0.2)

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    marks: list[tuple[float, float]] = []  # (switched, landed)
    try:
        nxt = time.monotonic()
        for _ in range(ships + 1):
            time.sleep(max(0.0, nxt - time.monotonic()))
            nxt += interval
            switched = time.monotonic()
            wal.ship(t)
            marks.append((switched, time.monotonic()))
    finally:
        stop.set()
        w.join(10)
    worst = [marks[k + 1][1] - marks[k][0] for k in range(len(marks) - 1)]
    lands = [landed - sw for sw, landed in marks]
    print(f"RPO at a {interval:g} s ship interval: worst loss {statistics.median(worst):.1f} s "
          f"median / {max(worst):.1f} s max over {len(worst)} intervals (ship itself: "
          f"{statistics.median(lands):.1f} s median)")


if __name__ == "__main__":
    main()
