"""Containerised PostgreSQL 17 dumped into restic (issue 17 item 6, issue 23 item 2).

    .venv/bin/python benchmarks/pg_container_bench.py [--rows 450000] [--repeat 5]

Starts its own local lab (moto S3 + sshd), a private Docker engine and PostgreSQL
17.x in a container built here (labkeeper.locallab.pgimage; host networking, no
published port), fills ``ctrbench`` with ``--rows`` rows, then measures, warm (one
untimed run of each kind first), interleaved, each kind into its own repository:

| kind | what |
|---|---|
| bare exec | ``docker exec -u postgres C pg_dump … \\| restic backup --stdin`` here |
| bare ssh exec | ``ssh HOST docker exec … pg_dump … \\| restic backup --stdin`` (OpenSSH client) |
| bare tcp 17 | ``pg_dump`` 17 (Debian 13's, under chroot) over TCP ``\\| restic …`` |
| ours ssh exec | ``backup_database``: ``container:`` on an SSH host (the SSH bridge) |
| ours exec | ``backup_database``: ``container:`` with ``host: localhost`` (docker here) |
| ours tcp 17 | ``backup_database`` over TCP, the matching client (17) picked |

Times are of the call in this process (bare: the shell pipeline's wall time).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from labkeeper import pg_backup, pg_client, restic  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab import pgimage  # noqa: E402
from labkeeper.locallab.docker import LocalDocker  # noqa: E402
from labkeeper.locallab.lab import LocalLab  # noqa: E402
from labkeeper.locallab.ports import free_port  # noqa: E402

KINDS = ("bare exec", "bare ssh exec", "bare tcp 17", "ours ssh exec", "ours exec",
         "ours tcp 17")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=450_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lk-ctr-bench-"))
    lab = LocalLab(work / "lab", postgres=False, pvesim=False)
    engine = LocalDocker(work / "docker")
    box = None
    try:
        lab.start()
        engine.start()
        docker = (engine.client, "--host", engine.host)
        box = pgimage.Pg17Container(docker, name="bench_pg17", port=free_port())
        box.start()
        bench(lab, engine, box, work, args.rows, args.repeat)
    finally:
        if box is not None:
            box.stop()
        engine.stop()
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


def bench(lab: LocalLab, engine: LocalDocker, box: pgimage.Pg17Container, work: Path,
          rows: int, repeat: int) -> None:
    pw = "bench-" + os.urandom(6).hex()
    box.psql(f"CREATE ROLE app LOGIN PASSWORD '{pw}';\nCREATE DATABASE ctrbench OWNER app;")
    box.psql("SET ROLE app;\nCREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT "
             "NULL, payload text NOT NULL);\nINSERT INTO events SELECT i, timestamptz "
             "'2024-01-01' + i * interval '1 s', md5(i::text) || md5((i * 7)::text) || "
             f"md5((i * 13)::text) FROM generate_series(1, {rows}) i;", db="ctrbench",
             timeout=900)
    (work / "pw").write_text(pw + "\n")
    bin_root = work / "pgbin"
    pgimage.link_host_client(bin_root, 15)
    pgimage.client_wrappers(bin_root, pgimage.rootfs_dir().path, 17)
    os.environ[pg_client.BIN_ROOT_ENV] = str(bin_root)

    inv = yaml.safe_load(lab.inventory_path.read_text())
    base = inv["repositories"][0]
    rootu = base["url"].rsplit("/", 1)[0]
    names = {k: k.replace(" ", "-") for k in KINDS}
    inv["repositories"] = [{**base, "name": n, "url": f"{rootu}/{n}",
                            "cache_dir": str(work / f"cache-{n}")} for n in names.values()]
    ctr = {"name": box.name, "docker_host": engine.host, "pghost": box.sockdir}
    common = {"port": box.port, "dbname": "ctrbench", "globals": False}
    inv["databases"] = [
        {"name": "sshexec", "host": "labhost", "user": "postgres", "container": ctr,
         "repository": names["ours ssh exec"], **common},
        {"name": "exec", "host": "localhost", "user": "postgres", "container": ctr,
         "repository": names["ours exec"], **common},
        {"name": "tcp", "host": "127.0.0.1", "user": "app", "password": f"file:{work / 'pw'}",
         "repository": names["ours tcp 17"], **common},
    ]
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(inv))
    loaded = load_inventory(path)
    repos = {k: pg_backup.open_repo(loaded, n) for k, n in names.items()}
    for r in repos.values():
        restic.init(r)
    sshd = lab.sshd
    restic_tail = ("restic --compression auto backup --stdin --stdin-filename ctrbench.sql "
                   "--host local-lab --tag bare --json > /dev/null")
    exec_dump = (f"{engine.client} --host {engine.host} exec -u postgres {box.name} "
                 f"pg_dump -Fp -h {box.sockdir} -p {box.port} -d ctrbench")
    ssh = (f"ssh -T -p {sshd.port} -i {sshd.user_key_path} -o BatchMode=yes "
           f"-o UserKnownHostsFile={sshd.known_hosts_path} {sshd.user}@{sshd.host}")
    bare = {
        "bare exec": f"{exec_dump} | {restic_tail}",
        "bare ssh exec": f"{ssh} {exec_dump} | {restic_tail}",
        "bare tcp 17": (f"{bin_root}/17/bin/pg_dump -Fp -h 127.0.0.1 -p {box.port} -U app "
                        f"-d ctrbench | {restic_tail}"),
    }
    ours = {"ours ssh exec": "sshexec", "ours exec": "exec", "ours tcp 17": "tcp"}
    size = len(subprocess.run(["bash", "-o", "pipefail", "-c", exec_dump], check=True,
                              capture_output=True).stdout)
    print(f"ctrbench: {rows} rows, plain dump {size / 1e6:.1f} MB", flush=True)

    def run(kind: str) -> float:
        t = time.monotonic()
        if kind in bare:
            subprocess.run(["bash", "-o", "pipefail", "-c", bare[kind]], check=True,
                           env={**os.environ, **repos[kind].env(), "PGPASSWORD": pw})
        else:
            pg_backup.backup_database(loaded, ours[kind])
        return time.monotonic() - t

    for kind in KINDS:  # warm-up, untimed
        run(kind)
    times: dict[str, list[float]] = {k: [] for k in KINDS}
    for i in range(repeat):
        for kind in KINDS:
            times[kind].append(run(kind))
        print(f"round {i + 1}: " + ", ".join(f"{k} {times[k][-1]:.2f}" for k in KINDS),
              flush=True)
    for kind in ("ours ssh exec", "ours exec"):  # where the time goes, one run each
        t0 = time.monotonic()
        print(f"\n{kind}, one run with its log:")
        class Timed(logging.Handler):  # the run's log lines, timed from t0
            def emit(self, record: logging.LogRecord, t0: float = t0) -> None:
                print(f"  {time.monotonic() - t0:6.2f} {record.getMessage()[:110]}")

        handler = Timed()
        logging.getLogger("labkeeper").addHandler(handler)
        logging.getLogger("labkeeper").setLevel(logging.INFO)
        pg_backup.backup_database(loaded, ours[kind])
        logging.getLogger("labkeeper").removeHandler(handler)
        print(f"  {time.monotonic() - t0:6.2f} done")
    print("\nmedians (s):")
    for kind in KINDS:
        med = statistics.median(times[kind])
        print(f"  {kind:14} {med:6.2f}  ({size / 1e6 / med:5.1f} MB/s)  "
              f"min {min(times[kind]):.2f} max {max(times[kind]):.2f}")


if __name__ == "__main__":
    main()
