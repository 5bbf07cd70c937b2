"""What a whole `labkeeper backup run` costs next to the bare pipeline (issue 24).

Run: .venv/bin/python benchmarks/run_cost_bench.py [--scale 30] [--repeat 3] [--small 10]
     [--no-temporary]

Starts its own LocalLab (PostgreSQL + moto S3), a pgbench database (random filler) and
a Prefect server, then times whole commands (a fresh process each, imports included):

1. bare: ``bash -o pipefail -c 'pg_dump | restic backup --stdin'`` (warm repository);
2. ``labkeeper backup run --db bench`` with ``PREFECT_API_URL`` set (a running server),
   in pairs with (1), order alternating;
3. the same with no server configured: the first command (no local server yet: it
   starts one and keeps it), then later commands (it answers), paired with (1);
   and once the old way for comparison (a flow run in a process with no API URL at
   all: Prefect's temporary server), unless ``--no-temporary``;
4. two commands at once with no server running (both must exit 0; one starts the
   local server, the other waits for it and uses it);
5. a night of ``--small`` small databases on one server (one run) against one small
   database, with ``settings.pg_backup_parallel`` 1 and 2;
6. import times: ``import cli.main``, ``import flows.pg_backup``.

Ratios are per pair (bare run next to it), medians (min-max). The machine is shared:
say the load average with the numbers (printed at the start and the end).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Measured as a user's machine runs it (and as `make` sets it): compiled bytecode is
# cached, so a process does not compile Prefect from source (PYTHONDONTWRITEBYTECODE
# in the caller's environment would add ≈1 s to every process measured).
if os.environ.pop("PYTHONDONTWRITEBYTECODE", None) and not os.environ.get("PYTHONPYCACHEPREFIX"):
    os.environ["PYTHONPYCACHEPREFIX"] = str(Path(sys.prefix) / "pycache")

from labkeeper import local_server as ls  # noqa: E402
from labkeeper import pg_backup, restic  # noqa: E402
from labkeeper.inventory import load_inventory  # noqa: E402
from labkeeper.locallab.lab import LocalLab  # noqa: E402
from labkeeper.locallab.ports import free_port  # noqa: E402
from labkeeper.locallab.prefect_server import LocalPrefectServer  # noqa: E402

CLI = (sys.executable, "-m", "cli.main")


def timed(argv: list[str] | tuple[str, ...], env: dict[str, str]) -> tuple[float, str, str]:
    t = time.monotonic()
    res = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.monotonic() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])} failed ({res.returncode}):\n"
                         f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return wall, res.stdout, res.stderr


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--small", type=int, default=10)
    ap.add_argument("--no-temporary", action="store_true",
                    help="skip the one run with Prefect's temporary server (the old way)")
    args = ap.parse_args()
    with started("lk-runcost-", args, "prefect-local") as b:
        b.run()


@contextlib.contextmanager
def started(prefix: str, args: argparse.Namespace, home: str) -> Iterator[Bench]:
    """A started lab and Prefect server, with a local-server home ``home`` beside them;
    everything stopped (the local server and its runner too) and removed on the way out."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    print(f"workdir {work}; load average {os.getloadavg()[0]:.1f} (2 cores)", flush=True)
    lab = LocalLab(work / "lab", sshd=False, pvesim=False)
    server = LocalPrefectServer(work / "prefect-running", port=free_port())
    local = ls.LocalServer(home=work / home, port=free_port())
    try:
        lab.start()
        server.start(timeout=300)
        yield Bench(lab, work, server, local, args)
    finally:
        ls.stop(local)
        ls.stop_runner(local)  # a runner started beside no local server
        server.stop()
        lab.stop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def prepared(prefix: str, args: argparse.Namespace) -> Iterator[Bench]:
    """:func:`started`, with the bench database and inventories made (a runner home
    beside them)."""
    with started(prefix, args, "runner-home") as b:
        b.make_database()
        b.inventories()
        yield b


class Bench:
    def __init__(self, lab: LocalLab, work: Path, server: LocalPrefectServer,
                 local: ls.LocalServer, args: argparse.Namespace) -> None:
        self.lab, self.work, self.server, self.local, self.args = lab, work, server, local, args
        self.pg = lab.postgres
        self.pw = self.pg.password_file.read_text().strip()
        base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        base.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HOME": str(work / "home")})
        self.env_server = {**base, "PREFECT_API_URL": server.api_url,
                           "PREFECT_HOME": str(work / "client-home")}
        self.env_none = {**base, "LABKEEPER_PREFECT_HOME": str(local.home),
                         "LABKEEPER_PREFECT_PORT": str(local.port)}
        self.results: dict[str, list[float]] = {}

    def add(self, key: str, value: float) -> None:
        self.results.setdefault(key, []).append(value)
        print(f"  {key:38} {value:6.2f}", flush=True)

    # -- set-up ------------------------------------------------------------------------
    def make_database(self) -> None:
        pg = self.pg
        pg.psql_super(f"CREATE DATABASE bench OWNER {pg.app_user};")
        env = {**os.environ, "PGPASSWORD": self.pw}
        t = time.monotonic()
        subprocess.run(["pgbench", "-i", "-q", "-s", str(self.args.scale), "-h", pg.host,
                        "-p", str(pg.port), "-U", pg.app_user, "bench"], env=env, check=True,
                       capture_output=True)
        subprocess.run(["psql", "-X", "-q", "-h", pg.host, "-p", str(pg.port), "-U",
                        pg.app_user, "-d", "bench", "-c",
                        "UPDATE pgbench_accounts SET filler = md5(aid::text) || "
                        "md5((aid * 7)::text) || left(md5((aid * 13)::text), 20)",
                        "-c", "VACUUM ANALYZE pgbench_accounts"], env=env, check=True,
                       capture_output=True)
        pg.psql_super("CHECKPOINT;", timeout=600)
        print(f"pgbench -i -s {self.args.scale} + random filler: {time.monotonic() - t:.1f} s",
              flush=True)

    def inventories(self) -> None:
        inv = yaml.safe_load(self.lab.inventory_path.read_text())
        base = inv["repositories"][0]
        root = base["url"].rsplit("/", 1)[0]
        names = ("bare", "ours", "small")
        inv["repositories"] = [{**base, "name": n, "url": f"{root}/{n}",
                                "cache_dir": str(self.work / f"cache-{n}")} for n in names]
        db0 = inv["databases"][0]
        small = self.pg.database_names[0]

        def write(name: str, dbs: list[dict[str, Any]], parallel: int = 1) -> Path:
            doc = {**inv, "databases": dbs}
            doc["settings"] = {**inv.get("settings", {}), "pg_backup_parallel": parallel}
            path = self.work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
            return path

        self.inv_one = write("one", [{**db0, "name": "bench", "dbname": "bench",
                                      "repository": "ours", "globals": True}])
        self.small_db = small
        smalls = [{**db0, "name": f"small{i}", "dbname": small, "repository": "small",
                   "globals": i == 0} for i in range(self.args.small)]
        self.inv_small1 = write("small1", smalls[:1])
        self.inv_small = write("smallN", smalls)
        self.inv_small_par = write("smallN-par2", smalls, parallel=2)
        loaded = load_inventory(self.inv_one)
        self.repos = {n: pg_backup.open_repo(loaded, n) for n in names}
        for r in self.repos.values():
            restic.init(r)

    def bare(self) -> float:
        pg = self.pg
        env = {**os.environ, **self.repos["bare"].env(), "PGPASSWORD": self.pw}
        wall, _o, _e = timed(["bash", "-o", "pipefail", "-c",
                              f"pg_dump -Fp -h {pg.host} -p {pg.port} -U {pg.app_user} bench | "
                              "restic --compression auto backup --stdin --stdin-filename "
                              "bench.sql --host local-lab --tag bare --json > /dev/null"], env)
        return wall

    def warm_runner(self) -> dict[str, str]:
        """A warm runner started beside the running server, checked to take commands;
        the environment that sends ``backup run`` to it."""
        env = {**self.env_server, "LABKEEPER_PREFECT_HOME": str(self.local.home)}
        ls.start_runner(self.local, env)
        deadline = time.monotonic() + 120
        while not ls.runner_socket(self.local).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _w, _o, err = self.ours({**env, "LABKEEPER_LOG_LEVEL": "DEBUG"}, self.inv_one)
        assert "runs in the runner's child" in err, err[-2000:]
        return env

    def ours(self, env: dict[str, str], inv: Path, db: str | None = "bench"
             ) -> tuple[float, str, str]:
        return timed([*CLI, "backup", "run", "--lab", str(inv),
                      *(["--db", db] if db else [])], env)

    # -- the runs ----------------------------------------------------------------------
    def run(self) -> None:
        self.make_database()
        self.inventories()
        print("warm-up (untimed): bare, ours with a server", flush=True)
        self.bare()
        self.ours(self.env_server, self.inv_one)
        self.imports()
        self.with_server()
        self.where()
        self.without_server()
        self.concurrent()
        if not self.args.no_temporary:
            self.temporary()
        self.many()
        self.report()

    def imports(self) -> None:
        for what in ("cli.main", "flows.pg_backup", "prefect"):
            for _ in range(2):
                wall, _o, _e = timed([sys.executable, "-c", f"import {what}"], dict(os.environ))
                self.add(f"import {what}", wall)

    def pairs(self, key: str, fn) -> None:
        for i in range(self.args.repeat):
            for kind in (("bare", key) if i % 2 == 0 else (key, "bare")):
                if kind == "bare":
                    b = self.bare()
                    self.add(f"bare (next to {key})", b)
                else:
                    o = fn()
                    self.add(key, o)
        bares = self.results[f"bare (next to {key})"]
        self.results[f"ratio {key}"] = [o / b for o, b in zip(self.results[key], bares,
                                                              strict=True)]

    def with_server(self) -> None:
        print("with a running server (PREFECT_API_URL set)", flush=True)
        self.pairs("ours, server running", lambda: self.ours(self.env_server, self.inv_one)[0])
        _w, out, err = self.ours(self.env_server, self.inv_one)
        self.globals_line = next((ln for ln in (err + out).splitlines()
                                  if "globals of" in ln), "(no globals line in the output)")

    WHERE = """\
import sys, time
t0 = time.monotonic()
from flows import pg_backup as f
t1 = time.monotonic()
marks = {}
def marked(name, fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            marks[name] = time.monotonic()
    return wrapper
# the flow body's first step (reading the inventory) and its last (the report)
f.load_inventory = marked("body start", f.load_inventory)
f.PgBackupReport.finish = marked("body end", f.PgBackupReport.finish)
s = f.pg_backup_flow(lab=sys.argv[1], databases=["bench"], return_state=True)
t2 = time.monotonic()
backup = {r["database"]: r for r in s.result()}["bench"]["duration s"]
print("PHASES", t1 - t0, t2 - t1, backup, marks["body start"] - t1,
      marks["body end"] - marks["body start"] - backup, t2 - marks["body end"], flush=True)
"""

    def where(self) -> None:
        """Where a warm one-database run's seconds go (server running): a child that
        times its imports and the flow call, the backup's own duration from its row,
        and the flow run around it in three parts: before the flow body (the run
        created, the start hook), the body's other steps (globals, the report), after
        the body (the final state, the end hook, Prefect's heartbeat thread joined)."""
        print("where the time goes (server running)", flush=True)
        for _ in range(self.args.repeat):
            pre, _o, _e = timed([sys.executable, "-c", "pass"], self.env_server)
            wall, out, _e = timed([sys.executable, "-c", self.WHERE, str(self.inv_one)],
                                  self.env_server)
            line = next(ln for ln in out.splitlines() if ln.startswith("PHASES"))
            imports, flow, backup, before, body, after = (float(x) for x in line.split()[1:])
            self.add("phase: python start", pre)
            self.add("phase: imports (flows.pg_backup)", imports)
            self.add("phase: flow run around the backup", flow - backup)
            self.add("phase:   before the flow body", before)
            self.add("phase:   body steps besides the backup", body)
            self.add("phase:   after the flow body", after)
            self.add("phase: the backup itself", backup)
            self.add("phase: process exit (interpreter teardown)",
                     wall - pre - imports - flow)

    def without_server(self) -> None:
        print("no server configured: first command (starts the local one), then later ones",
              flush=True)
        ls.stop(self.local)
        wall, _o, err = self.ours(self.env_none, self.inv_one)
        assert "starting a local one" in err, err
        self.add("ours, no server: first command", wall)
        self.pairs("ours, no server: later command",
                   lambda: self.ours(self.env_none, self.inv_one)[0])

    def concurrent(self) -> None:
        print("two commands at once, no server running", flush=True)
        ls.stop(self.local)
        t = time.monotonic()
        procs = [subprocess.Popen([*CLI, "backup", "run", "--lab", str(inv), *extra],
                                  env=self.env_none, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
                 for inv, extra in ((self.inv_one, ["--db", "bench"]), (self.inv_small1, []))]
        outs = [p.communicate() for p in procs]
        wall = time.monotonic() - t
        codes = [p.returncode for p in procs]
        locked = sum("database is locked" in o + e for o, e in outs)
        started = sum("starting a local one" in e for _o, e in outs)
        self.concurrent_line = (f"exit codes {codes}, {started} started the server, "
                                f"'database is locked' in {locked} output(s), both done in "
                                f"{wall:.1f} s (server start included)")
        print("  " + self.concurrent_line, flush=True)
        if codes != [0, 0]:
            for o, e in outs:
                print(o[-2000:], e[-2000:])

    def temporary(self) -> None:
        print("the old way once: no API URL at all (Prefect's temporary server)", flush=True)
        env = {k: v for k, v in self.env_none.items() if not k.startswith("LABKEEPER_PREFECT")}
        env["PREFECT_HOME"] = str(self.work / "temporary-home")
        code = ("import sys; from pathlib import Path; from cli.jobs import "
                f"run_backup_cli; sys.exit(run_backup_cli(Path({str(self.inv_one)!r}), "
                "'bench'))")
        t = time.monotonic()
        res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=False)
        if res.returncode == 0:
            self.add("old way: temporary server per command", time.monotonic() - t)
        else:  # seen under heavy load: the temporary server did not come up in time
            why = (res.stderr.strip().splitlines() or ["?"])[-1]
            print(f"  old way FAILED after {time.monotonic() - t:.1f} s: {why}", flush=True)

    def many(self) -> None:
        print(f"{self.args.small} small databases ({self.small_db}) vs one, server running",
              flush=True)
        self.ours(self.env_server, self.inv_small1, None)  # warm the small repository
        self.lock_retries = {1: 0, 2: 0}
        for _ in range(self.args.repeat):
            self.add("one small database", self.ours(self.env_server, self.inv_small1, None)[0])
            for par, inv in ((1, self.inv_small), (2, self.inv_small_par)):
                wall, out, err = self.ours(self.env_server, inv, None)
                self.add(f"{self.args.small} small, parallel {par}", wall)
                # restic 0.14 retrying a lock file another backup removed meanwhile
                self.lock_retries[par] += (out + err).count("restic is retrying Load(<lock/")

    def report(self) -> None:
        r = self.results
        print()
        print(f"load average now {os.getloadavg()[0]:.1f} (2 cores); medians (min-max), s")
        for k, v in r.items():
            if not k.startswith("ratio"):
                print(f"  {k:42} {spread(v)}")
        print("ratios to the bare pipeline run next to it (per pair):")
        for k in ("ours, server running", "ours, no server: later command"):
            print(f"  {k:42} {spread(r[f'ratio {k}'])}x")
        bare = statistics.median(r["bare (next to ours, server running)"]
                                 + r["bare (next to ours, no server: later command)"])
        first = r["ours, no server: first command"][0]
        print(f"  {'no server, first command (one-off start)':42} {first / bare:6.2f}x "
              f"(bare median {bare:.2f} s)")
        if "old way: temporary server per command" in r:
            old = r["old way: temporary server per command"][0]
            print(f"  {'old way: temporary server per command':42} {old / bare:6.2f}x")
        one = statistics.median(r["one small database"])
        for par in (1, 2):
            many = statistics.median(r[f"{self.args.small} small, parallel {par}"])
            print(f"  {self.args.small} small databases / one, parallel {par}: "
                  f"{many / one:.2f}x ({many:.2f} s / {one:.2f} s); restic lock-load "
                  f"retries seen: {self.lock_retries[par]}")
        print(f"two commands at once with no server: {self.concurrent_line}")
        print(f"globals row of a warm run: {self.globals_line.strip()}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
