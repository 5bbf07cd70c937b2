"""`make demo`: the local lab, a Prefect server, the lab's jobs run once, the UI address.

Flows run in child processes (the same way a worker runs them) pointed at the
demo's Prefect server, so their run history stays in ``<dir>/prefect`` and can
be browsed later with ``make ui``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

from labkeeper import process
from labkeeper.errors import CommandError
from labkeeper.locallab.lab import LocalLab
from labkeeper.locallab.ports import free_port
from labkeeper.locallab.prefect_server import LocalPrefectServer, prefect_env
from labkeeper.locallab.services import wait_for_interrupt


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_demo(workdir: Path, *, wait: bool, port: int, console: Console) -> int:
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    if (workdir / "lab" / "pids.json").exists():
        console.print(f"a demo lab seems to be running already ({workdir / 'lab'}); "
                      "stop it first")
        return 2
    # A fresh lab each time (the Prefect run history in <dir>/prefect is kept).
    shutil.rmtree(workdir / "lab", ignore_errors=True)
    lab = LocalLab(workdir / "lab")
    server = LocalPrefectServer(workdir / "prefect",
                                port=port if _port_free(port) else free_port())
    failures = 0
    try:
        console.rule("labkeeper demo")
        console.print("starting the local lab (PostgreSQL, S3, sshd, Proxmox simulator)…")
        lab.start()
        console.print(f"  inventory: {lab.inventory_path}")
        for name, pid in lab.pids().items():
            console.print(f"  {name}: pid {pid}")
        console.print("starting a Prefect server…")
        server.start()
        console.print(f"  Prefect UI: {server.url}")
        env = prefect_env(server.home, server.api_url)
        for title, argv in jobs(lab):
            console.rule(title)
            try:
                process.run(argv, timeout=900, env=env, on_stdout_line=_echo,
                            on_stderr_line=_echo)
            except CommandError as exc:
                failures += 1
                console.print(f"[red]{title} failed:[/] {exc}")
        console.rule("done")
        console.print(f"demo jobs finished in {time.monotonic() - started:.0f} s, "
                      f"{failures} failed")
        console.print(f"Run history: {server.url}/runs  (flow runs, logs, artifacts)")
        if wait:
            console.print("Everything stays up until Ctrl-C; then it is all stopped.")
            wait_for_interrupt()
        else:
            console.print("Stopping the lab and the Prefect server. The run history is kept "
                          f"in {server.home}; browse it with `make ui`.")
    finally:
        server.stop()
        lab.stop()
    return 1 if failures else 0


def _echo(line: str) -> None:
    print(line, flush=True)


def jobs(lab: LocalLab) -> list[tuple[str, tuple[str, ...]]]:
    """The demo's jobs, as child-process argv (each one a real flow run)."""
    py = sys.executable
    inv = str(lab.inventory_path)
    cli = (py, "-m", "labkeeper.cli")
    return [
        ("doctor: is every part of the lab reachable?", (*cli, "doctor", "--lab", inv)),
        ("provision: make the simulator match the inventory's guests",
         (*cli, "provision", "apply", "--lab", inv, "--yes",
          "--guest-state-dir", str(lab.workdir / "guest-state"))),
        ("provision again: the second plan is empty",
         (*cli, "provision", "plan", "--lab", inv)),
        ("vzdump: back up the demo guests, verify, prune, copy off-site",
         (*cli, "vzdump", "run", "demo", "--lab", inv)),
        ("pg_backup: dump every database into restic on the S3 bucket, proven complete",
         (*cli, "backup", "run", "--lab", inv)),
        ("repo maintenance: forget by retention (dry run), prune, check, usage",
         (*cli, "repo", "maintain", "--lab", inv, "--dry-run")),
        ("status: is my lab safe?", (*cli, "status", "--lab", inv)),
    ]
