"""PostgreSQL backup steps as Prefect tasks (thin wrappers over labkeeper.pg_backup)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper import pg_backup, pg_globals
from labkeeper.inventory import Inventory
from tasks.common import RETRY

# The outer bound; the stream itself is bounded by the database's timeout_minutes.
BACKUP_TASK_TIMEOUT = 6 * 3600
GLOBALS_TASK_TIMEOUT = 1800


@task(name="pg-backup-database", task_run_name="backup-{name}",
      timeout_seconds=BACKUP_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def backup_database(inv: Inventory, name: str, stall_timeout: float = 300.0
                    ) -> pg_backup.BackupResult:
    """Dump one database into restic with a manifest from the same snapshot."""
    return pg_backup.backup_database(inv, name, stall_timeout=stall_timeout)


@task(name="pg-globals-check", task_run_name="globals-check-{label}",
      timeout_seconds=GLOBALS_TASK_TIMEOUT, cache_policy=NO_CACHE)
def check_globals(inv: Inventory, label: str, databases: list[str]
                  ) -> pg_backup.GlobalsResult | None:
    """The row of one server's globals when unchanged since their last stored dump
    (nothing stored); None when they must be stored (:func:`backup_globals`)."""
    result = pg_globals.check_globals(inv, label, databases)
    if result is not None and result.status != "ok":
        get_run_logger().warning("globals of %s: %s", label, result.detail)
    return result


@task(name="pg-backup-globals", task_run_name="globals-{label}",
      timeout_seconds=GLOBALS_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def backup_globals(inv: Inventory, label: str, databases: list[str],
                   stall_timeout: float = 300.0) -> pg_backup.GlobalsResult:
    """pg_dumpall --globals-only of one server (a warning when not allowed); stored only
    when they changed since the last stored dump (the row then names that snapshot)."""
    logger = get_run_logger()
    result = pg_globals.backup_globals_if_changed(inv, label, databases,
                                                  stall_timeout=stall_timeout)
    if result.status != "ok":
        logger.warning("globals of %s: %s", label, result.detail)
    return result
