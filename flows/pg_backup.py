"""The nightly PostgreSQL backup: every database dumped into restic, proven complete.

Per run: globals of each server (a warning when the role may not read them), then
each database in turn (``tasks.pg_backup.backup_database``: manifest from the
dump's own snapshot, pg_dump streamed into restic with end-of-stream under our
control, verified). One failed database does not stop the others; the run fails
at the end if any failed. Leaves a table artifact ``pg-backup``, emits
``labkeeper.backup.succeeded`` / ``labkeeper.backup.failed`` per database; the flow
hooks ping the inventory's healthchecks URL for ``pg_backup`` and notify on failure.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.futures import PrefectFuture
from prefect.states import State

from flows.report import print_run
from labkeeper import metrics, pg_backup
from labkeeper.errors import ConfigError
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.secrets import redact
from tasks import pg_backup as backup_tasks
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "pg-backup"


class BackupRunFailed(RunFailed):
    """At least one database (of several) failed."""


def select_databases(inv: Inventory, databases: list[str] | None,
                     repository: str | None) -> list[str]:
    names = list(databases) if databases else [db.name for db in inv.databases]
    for n in names:
        inv.database(n)  # unknown names fail now, with a "did you mean"
    if repository:
        inv.repository(repository)
        names = [n for n in names if inv.repository_for(inv.database(n)).name == repository]
    if not names:
        raise ConfigError("no database to back up (check databases= and repository=)")
    return names


def _emit(inv: Inventory, name: str, ok: bool, payload: dict[str, Any]) -> None:
    db = inv.database(name)
    server = inv.database_server(db)
    emit_event(
        event=f"labkeeper.backup.{'succeeded' if ok else 'failed'}",
        resource={"prefect.resource.id": f"labkeeper.database.{server}/{name}",
                  "prefect.resource.name": name, "labkeeper.lab": inv.lab.name},
        payload=payload,
    )


def _failed_row(name: str, detail: str) -> dict[str, Any]:
    return {"database": name, "status": "failed", "snapshot": "", "bytes dumped": 0,
            "bytes added (uncompressed)": 0, "duration s": 0, "throughput MB/s": 0,
            "tables": 0, "backup id": "", "notes": redact(detail)}


@flow(name="pg_backup", log_prints=False, timeout_seconds=12 * 3600, **hooks("pg_backup"))
def pg_backup_flow(lab: str | None = None, databases: list[str] | None = None,
                   repository: str | None = None) -> list[dict]:
    """Back up the lab's PostgreSQL databases (default: all) into restic.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        databases: Only these databases (their names in the inventory); empty: every
            database.
        repository: Only the databases that back up into this restic repository.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    stall_timeout = inv.settings.tuning.stall_timeout
    names = select_databases(inv, databases, repository)
    logger.info("pg_backup: %d database(s) of lab %s: %s", len(names), inv.lab.name,
                ", ".join(names))
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    warnings: list[str] = []
    for label, dbs in pg_backup.globals_servers(inv, names).items():
        state = backup_tasks.backup_globals(inv, label, dbs, stall_timeout=stall_timeout,
                                            return_state=True)
        if state.is_completed():
            g: pg_backup.GlobalsResult = state.result()
            rows.append(g.row())
            if g.status != "ok":
                warnings.append(f"globals {label}: {g.detail}")
        else:
            exc = failure_of(state)
            detail = f"globals NOT backed up: {exc}"
            warnings.append(f"globals {label}: {detail}")
            logger.warning("globals of %s: %s", label, detail)
            rows.append({**_failed_row(f"globals {label}", detail), "status": "warning"})
    samples: list[metrics.Sample] = []
    states = _database_states(inv, names, stall_timeout, inv.settings.pg_backup_parallel)
    for name in names:
        state = states[name]
        series = {"series": f"db:{inv.database_server(name)}/{name}", "kind": "pg_dump"}
        samples.append(metrics.Sample("labkeeper_backup_last_run_timestamp_seconds", series,
                                      time.time()))
        samples.append(metrics.Sample("labkeeper_backup_success", series,
                                      1 if state.is_completed() else 0))
        if state.is_completed():
            res: pg_backup.BackupResult = state.result()
            samples += [
                metrics.Sample("labkeeper_backup_last_success_timestamp_seconds", series,
                               time.time()),
                metrics.Sample("labkeeper_backup_duration_seconds", series, res.duration_s),
                metrics.Sample("labkeeper_backup_dumped_bytes", series, res.bytes_dumped),
                metrics.Sample("labkeeper_backup_added_bytes", series, res.data_added),
            ]
            rows.append(res.row())
            _emit(inv, name, True, {"snapshot_id": res.snapshot_id,
                                    "backup_id": res.backup_id,
                                    "bytes_dumped": res.bytes_dumped,
                                    "duration_s": round(res.duration_s, 2),
                                    "tables": res.table_count})
        else:
            exc = failure_of(state)
            detail = f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name)
            logger.error("%s: %s", name, redact(detail))
            failed.append(name)
            rows.append(_failed_row(name, detail))
            _emit(inv, name, False, {"error": redact(detail)[:2000]})
    try:
        metrics.record(inv.settings.state_dir, inv.settings.metrics.textfile, samples)
    except OSError as exc:
        logger.warning("metrics not recorded: %s", exc)
    elapsed = time.monotonic() - started
    ok = len(names) - len(failed)
    create_table_artifact(key=ARTIFACT_KEY, table=rows,
                          description=f"pg_backup of {inv.lab.name}: {ok} ok / "
                                      f"{len(failed)} failed / {len(warnings)} warning(s)")
    create_markdown_artifact(key=f"{ARTIFACT_KEY}-summary",
                             markdown=_summary(rows, warnings, elapsed))
    for w in warnings:
        logger.warning(w)
    if failed:
        raise BackupRunFailed(f"{len(failed)} of {len(names)} database backups failed: "
                              f"{', '.join(failed)}", rows)
    return rows


def _database_states(inv: Inventory, names: list[str], stall_timeout: float,
                     parallel: int) -> dict[str, State]:
    """Each database's final task state; at most ``parallel`` backups at a time (1: one
    after the other in this thread, as before)."""
    if parallel <= 1 or len(names) == 1:
        return {n: backup_tasks.backup_database(inv, n, stall_timeout=stall_timeout,
                                                return_state=True) for n in names}
    states: dict[str, State] = {}
    running: deque[tuple[str, PrefectFuture[Any]]] = deque()
    for n in names:
        if len(running) >= parallel:  # the oldest first: the rows keep the order anyway
            done, fut = running.popleft()
            fut.wait()
            states[done] = fut.state
        running.append((n, backup_tasks.backup_database.submit(inv, n,
                                                               stall_timeout=stall_timeout)))
    for done, fut in running:
        fut.wait()
        states[done] = fut.state
    return states


def _summary(rows: list[dict[str, Any]], warnings: list[str], elapsed: float) -> str:
    icon = {"ok": "✅", "warning": "⚠️", "failed": "❌"}
    lines = ["# labkeeper pg_backup", "", f"{len(rows)} item(s) in {elapsed:.1f} s", "",
             "| | database | snapshot | bytes | MB/s | tables | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = str(r["notes"]).replace("|", "\\|")
        lines.append(f"| {icon.get(r['status'], '')} | {r['database']} | {r['snapshot']} | "
                     f"{r['bytes dumped']} | {r['throughput MB/s']} | {r['tables']} | {notes} |")
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {redact(w)}" for w in warnings]
    return "\n".join(lines)


def run_backup_cli(lab: Path, db: str | None) -> int:
    """``labkeeper backup run [--db NAME]``: run the flow, print the table, exit code."""
    state = pg_backup_flow(lab=str(lab), databases=[db] if db else None, return_state=True)
    return print_run(state, title="pg_backup", name_col="database", what="backup",
                     cols=("database", "status", "snapshot", "bytes dumped", "duration s",
                           "throughput MB/s", "tables"))


if __name__ == "__main__":
    pg_backup_flow()
