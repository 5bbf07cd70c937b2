"""The nightly PostgreSQL backup: every database dumped into restic, proven complete.

Per run: each database in turn (``tasks.pg_backup.backup_database``: manifest from
the dump's own snapshot, pg_dump streamed into restic with end-of-stream under our
control, verified), with each server's globals checked alongside the first one (no
restic: unchanged globals are not stored again) and stored after the databases only
when they changed (a warning when the role may not read them). One failed database
does not stop the others; the run fails at the end if any failed. Leaves a table
artifact ``pg-backup``, emits ``labkeeper.backup.succeeded`` / ``labkeeper.backup.failed``
per database; the flow hooks ping the inventory's healthchecks URL for ``pg_backup``
and notify on failure.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import PrefectFuture
from prefect.states import State

from labkeeper import pg_backup, pg_client
from labkeeper.errors import ConfigError
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.run_report.backups import PgBackupReport
from tasks import pg_backup as backup_tasks
from tasks.common import RunFailed, lab_path
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


@contextlib.contextmanager
def restic_ahead(lab: str | None = None, databases: list[str] | None = None,
                 repository: str | None = None) -> Iterator[None]:
    """Around a run of :func:`pg_backup_flow` with these parameters (the command line
    and a served run's process wrap it): the first databases' restic starts now, so its
    start-up overlaps the run's own (``labkeeper.pg_backup.ahead``); what the run does
    not take is stopped after it. Best effort: a problem here is the run's to report."""
    try:
        inv = load_inventory(lab_path(lab))
        names = select_databases(inv, databases, repository)
    except Exception:  # the run loads the same and says what is wrong
        yield
        return
    with pg_backup.started_ahead(inv, names[:inv.settings.pg_backup_parallel]):
        yield


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
    report = PgBackupReport(inv, ARTIFACT_KEY, logger)
    with pg_client.majors_remembered():  # each server asked its version once
        _back_up(inv, names, report, stall_timeout)
    report.finish(len(names))
    if report.failed:
        raise BackupRunFailed(f"{len(report.failed)} of {len(names)} database backups "
                              f"failed: {', '.join(report.failed)}", report.rows)
    return report.rows


def _back_up(inv: Inventory, names: list[str], report: PgBackupReport,
             stall_timeout: float) -> None:
    """The databases, with each server's globals checked alongside the first one."""
    servers = pg_backup.globals_servers(inv, names)
    checks = {label: backup_tasks.check_globals.submit(inv, label, dbs)
              for label, dbs in servers.items()}
    states = _database_states(inv, names, stall_timeout, inv.settings.pg_backup_parallel)
    for label, dbs in servers.items():
        report.globals_done(label, _globals_state(inv, label, dbs, checks[label],
                                                  stall_timeout))
    for name in names:
        report.database_done(name, states[name])


def _globals_state(inv: Inventory, label: str, dbs: list[str], check: PrefectFuture[Any],
                   stall_timeout: float) -> State:
    """The check's state when the globals were unchanged; else (changed, or the check
    failed) the state of storing them, once the database backups are done: a restic
    ending beside another's start costs restic 0.14 a 45-95 s lock-load retry."""
    check.wait()
    state = check.state
    if state.is_completed() and state.result() is not None:
        return state
    return backup_tasks.backup_globals(inv, label, dbs, stall_timeout=stall_timeout,
                                       return_state=True)


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


if __name__ == "__main__":
    pg_backup_flow()
