"""`make demo`: the local lab, a Prefect server, the lab's jobs run once, the UI address.

Flows run in child processes (the same way a worker runs them) pointed at the
demo's Prefect server, so their run history stays in ``<dir>/prefect`` and can
be browsed later with ``make ui``.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from deployments.serve import declared
from labkeeper import process
from labkeeper.locallab.lab import PG_CONTAINER, PG_CONTAINER_DB, LocalLab
from labkeeper.locallab.ports import free_port
from labkeeper.locallab.prefect_server import LocalPrefectServer, prefect_env
from labkeeper.locallab.services import Service, wait_for_interrupt


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _run_job(job: Job, env: dict[str, str], console: Console) -> bool:
    """Run one demo job as the command a user would type; True when it exited as expected."""
    console.rule(job.title)
    if job.before is not None:
        job.before()
    res = process.run(job.argv, timeout=900, env=env, on_stdout_line=_echo,
                      on_stderr_line=_echo, check=False)
    if res.returncode not in job.expect:
        console.print(f"[red]{job.title}: exit {res.returncode}[/] "
                      f"(expected {sorted(job.expect)})")
        return False
    if res.returncode:
        console.print(f"[yellow]exit {res.returncode}, as expected:[/] {job.why}")
    return True


def run_demo(workdir: Path, *, wait: bool, port: int, console: Console,
             docker: bool = True) -> int:
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "lab" / "pids.json").exists():
        console.print(f"a demo lab seems to be running already ({workdir / 'lab'}); "
                      "stop it first")
        return 2
    # A fresh lab each time (the Prefect run history in <dir>/prefect is kept).
    shutil.rmtree(workdir / "lab", ignore_errors=True)
    lab = LocalLab(workdir / "lab", docker=docker)
    server = LocalPrefectServer(workdir / "prefect",
                                port=port if _port_free(port) else free_port())
    failures = 0
    served: Service | None = None
    try:
        console.rule("labkeeper demo")
        console.print("starting the local lab (PostgreSQL, S3, sshd, Proxmox simulator"
                      + (", Docker engine, registry, PostgreSQL 17 in a container)…"
                         if docker else ")…"))
        lab.start()
        console.print(f"  inventory: {lab.inventory_path}")
        _say_docker(lab, console, docker)
        for name, pid in lab.pids().items():
            console.print(f"  {name}: pid {pid}")
        console.print("starting a Prefect server…")
        server.start()
        console.print(f"  Prefect UI: {server.url}")
        env = prefect_env(server.home, server.api_url)
        failures = sum(not _run_job(job, env, console) for job in jobs(lab))
        console.rule("serve: every deployment, with its schedule and Run button")
        served = serve_deployments(lab, server, env, workdir, console)
        console.rule("done")
        console.print(f"demo jobs finished in {time.monotonic() - started:.0f} s, "
                      f"{failures} failed")
        console.print(f"Run history: {server.url}/runs  (flow runs, logs, artifacts)")
        console.print(f"Deployments: {server.url}/deployments  (Run buttons; runbooks via "
                      "`runbook`, with its name and params)")
        if wait:
            console.print("Everything stays up until Ctrl-C; then it is all stopped.")
            wait_for_interrupt()
        else:
            console.print("Stopping the lab and the Prefect server. The run history is kept "
                          f"in {server.home}; browse it with `make ui`.")
    finally:
        if served is not None:
            served.stop(grace=10)
        server.stop()
        lab.stop()
    return 1 if failures else 0


def _say_docker(lab: LocalLab, console: Console, wanted: bool) -> None:
    if lab.docker is not None and lab.images is not None:
        built = sum(v for k, v in lab.images.seconds.items() if k != "rootfs_bytes")
        console.print(f"  Docker engine: {lab.docker.host} (client {lab.docker.client}, "
                      f"started in {lab.docker.start_seconds:.1f} s); registry "
                      f"{lab.images.registry}; app images built in {built:.1f} s")
    elif wanted:
        console.print("[yellow]  Docker engine: not available, the Compose update and the "
                      "containerised database are skipped and the rest runs. Why:[/]\n"
                      f"{lab.docker_error}")
        return
    if lab.db_container is not None:
        console.print(f"  PostgreSQL 17 in container {PG_CONTAINER} (127.0.0.1:"
                      f"{lab.db_container.port}, nothing published): database "
                      f"`{PG_CONTAINER_DB}`, dumped by `docker exec` over SSH")
    elif wanted:
        console.print(f"[yellow]  PostgreSQL container: not available, `{PG_CONTAINER_DB}` "
                      f"is not in the inventory and the rest runs. Why:[/]\n"
                      f"{lab.db_container_error}")


def serve_deployments(lab: LocalLab, server: LocalPrefectServer, env: dict[str, str],
                      workdir: Path, console: Console, *, timeout: float = 120
                      ) -> Service | None:
    """``labkeeper serve`` in a child process against the demo's server: registers every
    deployment of prefect.yaml (schedules, Run buttons) and runs what is started from the
    UI while the demo stays up. Stopped by PID with the rest."""
    svc = Service("labkeeper-serve", (sys.executable, "-m", "cli.main", "serve"),
                  log_path=workdir / "serve.log",
                  env={**env, "LABKEEPER_LAB": str(lab.inventory_path),
                       "LABKEEPER_HOME": str(Path(__file__).resolve().parents[1])})
    svc.start()
    want = len(declared())
    deadline = time.monotonic() + timeout
    count = 0
    while time.monotonic() < deadline:
        svc.check_alive()
        count = _deployment_count(server.api_url)
        if count >= want:
            console.print(f"  {count} deployments served (pid {svc.pid}); log: "
                          f"{workdir / 'serve.log'}")
            return svc
        time.sleep(1)
    console.print(f"[yellow]only {count} of {want} deployments registered after "
                  f"{timeout:g} s; see {workdir / 'serve.log'}[/]")
    return svc


def _deployment_count(api_url: str) -> int:
    import json
    import urllib.request

    req = urllib.request.Request(f"{api_url}/deployments/count", data=b"{}",  # noqa: S310
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - the demo's own server
            return int(json.loads(r.read()))
    except (OSError, ValueError):
        return 0


def _echo(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Job:
    """One demo step: a real labkeeper command (a flow run), in a child process."""

    title: str
    argv: tuple[str, ...]
    expect: frozenset[int] = frozenset({0})
    why: str = ""
    before: Callable[[], None] | None = None


def jobs(lab: LocalLab) -> list[Job]:
    """The demo's jobs, in order."""
    py = sys.executable
    inv = str(lab.inventory_path)
    cli = (py, "-m", "cli.main")
    return [
        Job("doctor: is every part of the lab reachable?", (*cli, "doctor", "--lab", inv)),
        Job("provision: make the simulator match the inventory's guests",
            (*cli, "provision", "apply", "--lab", inv, "--yes")),
        Job("provision again: the second plan is empty",
            (*cli, "provision", "plan", "--lab", inv)),
        Job("vzdump: back up the demo guests, verify, prune, copy off-site",
            (*cli, "vzdump", "run", "demo", "--lab", inv)),
        Job("pg_backup: dump every database into restic on the S3 bucket, proven complete",
            (*cli, "backup", "run", "--lab", inv)),
        Job("paths: back up a file tree with restic on the host, over SSH",
            (*cli, "paths", "run", "--lab", inv)),
        Job("update: `good` updates to 2.0; `bad` breaks its health page and is rolled back",
            (*cli, "update", "good", "bad", "--lab", inv),
            expect=frozenset({2}), why="`bad` was rolled back from its pre-update snapshot "
                                       "and is healthy on 1.0 again",
            before=lab.prepare_apps),
        *_compose_jobs(lab, cli, inv),
        Job("drill: restore appdb for real into a scratch database, verify, time it",
            (*cli, "drill", "run", "db:appdb", "--lab", inv)),
        *_db_container_jobs(lab, cli, inv),
        Job("drill: restore the proxy guest's latest vzdump into a scratch VMID, boot it",
            (*cli, "drill", "run", "guest:proxy", "--lab", inv)),
        Job("runbook (dry run): restore-database checks every reference, changes nothing",
            (*cli, "runbook", "run", "restore-database", "--param", "database=appdb",
             "--dry-run", "--lab", inv)),
        Job("runbook (dry run): pre-maintenance for proxy and app",
            (*cli, "runbook", "run", "pre-maintenance", "--param", "guests=proxy,app",
             "--dry-run", "--lab", inv)),
        Job("repo maintenance: forget by retention (dry run), prune, check, usage",
            (*cli, "repo", "maintain", "--lab", inv, "--dry-run")),
        Job("status: is my lab safe?", (*cli, "status", "--lab", inv)),
    ]


def _compose_jobs(lab: LocalLab, cli: tuple[str, ...], inv: str) -> list[Job]:
    """The Compose update on the real engine (none when the engine is not there)."""
    if lab.images is None:
        return []
    return [Job(
        "update (Compose, real Docker engine): `compose-good` pulls version 2 and passes; "
        "`compose-bad` pulls a broken version 2, fails its gate and is rolled back",
        (*cli, "update", "compose-good", "compose-bad", "--lab", inv),
        expect=frozenset({2}), why="`compose-bad` was rolled back to its previous image and "
                                   "is healthy on version 1 again",
        before=lab.prepare_compose_apps)]


def _db_container_jobs(lab: LocalLab, cli: tuple[str, ...], inv: str) -> list[Job]:
    """The containerised database's drill (none when its container is not there)."""
    if lab.db_container is None:
        return []
    return [Job(f"drill: restore `{PG_CONTAINER_DB}` inside {PG_CONTAINER}, verify vs its "
                "manifest",
                (*cli, "drill", "run", f"db:{PG_CONTAINER_DB}", "--lab", inv))]
