"""`labkeeper wal|basebackup|restore pitr|pitr ...`: point-in-time recovery commands.

``wal receive`` is the long-running service (systemd unit in docs/PITR.md); the other
commands run one step now, through the same core the Prefect flows use
(:mod:`flows.pitr` schedules them). Exit codes: 0 ok, 1 failed or warnings, 2 bad
inventory or arguments.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from labkeeper.errors import ConfigError, LabkeeperError

wal_app = typer.Typer(no_args_is_help=True, help="Continuous WAL archiving (PITR).")
basebackup_app = typer.Typer(no_args_is_help=True, help="PostgreSQL base backups (PITR).")
restore_app = typer.Typer(no_args_is_help=True, help="Restores.")
pitr_app = typer.Typer(no_args_is_help=True, help="Point-in-time recovery: drill, retention.")
console = Console()
err_console = Console(stderr=True)

LabOption = Annotated[Path, typer.Option("--lab", "-l", help="Inventory file.",
                                         envvar="LABKEEPER_LAB")]
ServerArg = Annotated[str | None, typer.Argument(help="A pitr server (default: all).")]


def register(app: typer.Typer) -> None:
    app.add_typer(wal_app, name="wal")
    app.add_typer(basebackup_app, name="basebackup")
    app.add_typer(restore_app, name="restore")
    app.add_typer(pitr_app, name="pitr")


def _say(line: str) -> None:
    """The command's own result (JSON rows, a hint) on stdout; progress is logged (stderr)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)  # JSON: one line


def _targets(lab: Path, server: str | None, *, match_client: bool = True) -> list[Any]:
    from labkeeper.inventory import load_inventory
    from labkeeper.inventory.pitr import pitr_servers
    from labkeeper.pitr import target

    inv = load_inventory(lab)
    names = [server] if server else [s.name for s in pitr_servers(inv)]
    if not names:
        raise ConfigError("the inventory has no pitr servers (section pitr:)")
    return [target.resolve(inv, n, match_client=match_client) for n in names]


def _guarded(fn: Callable[[], int]) -> None:
    try:
        code = fn()
    except ConfigError as exc:
        err_console.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    except LabkeeperError as exc:
        err_console.print(str(exc), markup=False)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@wal_app.command("receive")
def wal_receive(server: ServerArg = None, lab: LabOption = Path("lab.yaml")) -> None:
    """Run pg_receivewal (supervised, restarted with backoff) until SIGTERM/SIGINT."""
    from labkeeper import log_setup
    from labkeeper.pitr import wal

    def go() -> int:
        sups = [wal.WalReceiver(t) for t in _targets(lab, server)]
        stop = threading.Event()

        def on_signal(_sig: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        threads = [threading.Thread(target=log_setup.in_context(s.run),
                                    name=f"receive-{s.target.name}", daemon=True)
                   for s in sups]
        for th in threads:
            th.start()
        stop.wait()
        for s in sups:
            s.stop()
        for th in threads:
            th.join(30)
        return 0

    _guarded(go)


@wal_app.command("ship")
def wal_ship(server: ServerArg = None, lab: LabOption = Path("lab.yaml"),
             no_switch: Annotated[bool, typer.Option(
                 "--no-switch", help="Do not close the server's current segment first.")] = False,
             ) -> None:
    """Ship completed WAL segments from the spool into the repository (verified first)."""
    from labkeeper.pitr import wal

    def go() -> int:
        failed = 0
        for t in _targets(lab, server):
            try:
                res = wal.ship(t, switch=False if no_switch else None)
                _say(json.dumps(res.row()))
            except LabkeeperError as exc:
                failed += 1
                err_console.print(str(exc), markup=False)
        return 1 if failed else 0

    _guarded(go)


@wal_app.command("status")
def wal_status(server: ServerArg = None, lab: LabOption = Path("lab.yaml"),
               json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Receive lag, ship lag, slot retention, newest WAL in the repository; warnings."""
    from labkeeper.pitr import lag

    def go() -> int:
        warned = 0
        for t in _targets(lab, server):
            facts, warnings = lag.report(t)
            warned += len(warnings)
            if json_out:
                _say(json.dumps({**facts.to_dict(), "warnings": warnings}, default=str))
                continue
            _say(f"{t.name}: lsn {facts.current_lsn or '?'}, slot "
                 f"{'active' if facts.slot_active else 'INACTIVE'}, retained "
                 f"{facts.retained_bytes if facts.retained_bytes is not None else '?'} bytes, "
                 f"{facts.spool_ready} segment(s) waiting, newest WAL in repository "
                 f"{facts.newest_wal_in_repo or 'none'}")
            for w in warnings:
                _say(f"  WARNING {w}")
        return 1 if warned else 0

    _guarded(go)


@basebackup_app.command("run")
def basebackup_run(server: ServerArg = None, lab: LabOption = Path("lab.yaml")) -> None:
    """Take a base backup now (pg_basebackup streamed into restic, proven complete)."""
    from labkeeper.pitr import basebackup

    def go() -> int:
        for t in _targets(lab, server):
            _say(json.dumps(basebackup.run_base_backup(t).row()))
        return 0

    _guarded(go)


@restore_app.command("pitr")
def restore_pitr(
    server: Annotated[str, typer.Argument(help="The pitr server to restore.")],
    to: Annotated[str, typer.Option("--to", help="ISO time, LSN or 'latest'.")],
    lab: LabOption = Path("lab.yaml"),
    on: Annotated[str, typer.Option("--on", help=(
        "Where the result goes: 'local' (the recovered cluster stays running on this "
        "host), or a drill server of the inventory (drills.servers): the recovered "
        "databases are copied there as labkeeper_drill_* databases."))] = "local",
    database: Annotated[list[str] | None, typer.Option(
        "--database", help="With --on DRILL-SERVER: only this database (repeatable).")
    ] = None,
    directory: Annotated[Path | None, typer.Option(
        "--dir", help="New directory for the restored cluster.")] = None,
    pause: Annotated[bool, typer.Option(help="Pause at the target instead of promoting.")
                     ] = False,
) -> None:
    """Restore SERVER as of --to into a new scratch directory on this host (never onto the
    live server); the restored cluster keeps running for inspection. With --on
    DRILL-SERVER the recovered databases are copied onto that drill server and the
    scratch cluster is removed."""
    from labkeeper.pitr import restore

    def go() -> int:
        if on != "local":
            return _restore_onto_drill_server(lab, server, to, on, database)
        if database:
            raise ConfigError("--database: only with --on DRILL-SERVER (locally the whole "
                              "cluster is restored)")
        t = _targets(lab, server, match_client=False)[0]
        where = directory or Path(t.spool).parent / "restores" / to.replace("/", "_").replace(
            ":", "")
        res = restore.restore_pitr(t, restore.parse_target(to), where,
                                   action="pause" if pause else "promote")
        _say(json.dumps(res.row()))
        _say(f"stop it with: pg_ctl -D {res.workdir}/data stop")
        return 0

    _guarded(go)


def _restore_onto_drill_server(lab: Path, server: str, to: str, on: str,
                               databases: list[str] | None) -> int:
    from labkeeper.inventory import load_inventory
    from labkeeper.pitr import copy as pitr_copy

    res, copies = pitr_copy.drill_copies(load_inventory(lab), server, to, on,
                                         databases=databases)
    row = res.row()
    for key in ("connect", "status"):
        row.pop(key, None)
    _say(json.dumps({**row, "status": "copied", "on": on, "scratch cluster": "removed",
                     "copies": [{"database": c.source, "copy": c.into, "where": c.where,
                                 "tables": len(c.counts), "rows": c.rows,
                                 "privileges": c.privileges} for c in copies]}))
    for c in copies:
        _say(f"{c.source} as of {res.target}: {c.into} on {c.where} ({c.rows} rows in "
             f"{len(c.counts)} tables)")
    return 0


@pitr_app.command("drill")
def pitr_drill(server: ServerArg = None, lab: LabOption = Path("lab.yaml"),
               seed: Annotated[int | None, typer.Option(help="Random target seed.")] = None
               ) -> None:
    """Restore for real to a random moment and to the newest; judge RTO/RPO."""
    from labkeeper.pitr import drill

    def go() -> int:
        failed = 0
        for t in _targets(lab, server, match_client=False):
            res = drill.run_drill(t, seed=seed)
            for row in res.rows:
                _say(json.dumps(row.row()))
            for b in res.breaches:
                _say(f"BREACH {t.name}: {b}")
            failed += 0 if res.ok else 1
        return 1 if failed else 0

    _guarded(go)


@pitr_app.command("retention")
def pitr_retention(server: ServerArg = None, lab: LabOption = Path("lab.yaml"),
                   dry_run: Annotated[bool, typer.Option("--dry-run")] = False) -> None:
    """Forget base backups beyond the policy and the WAL only they needed."""
    from labkeeper.pitr import retention

    def go() -> int:
        for t in _targets(lab, server, match_client=False):
            retention.apply(t, dry_run=dry_run)
        return 0

    _guarded(go)
