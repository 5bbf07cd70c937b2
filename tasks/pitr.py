"""PITR steps as Prefect tasks (thin wrappers over labkeeper.pitr)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper.inventory import Inventory
from labkeeper.pitr import basebackup, crosscheck, drill, lag, retention, target, wal
from labkeeper.pitr import copy as pitr_copy
from tasks.common import RETRY


@task(name="pitr-base-backup", task_run_name="base-backup-{server}",
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE, **RETRY)
def base_backup(inv: Inventory, server: str) -> basebackup.BaseBackupResult:
    """pg_basebackup streamed into restic, proven complete, LSN range recorded."""
    return basebackup.run_base_backup(target.resolve(inv, server))


@task(name="pitr-ship-wal", task_run_name="ship-wal-{server}", timeout_seconds=3600,
      cache_policy=NO_CACHE, **RETRY)
def ship_wal(inv: Inventory, server: str) -> wal.ShipResult:
    """Completed spool segments into restic in one run; removed once verified there."""
    return wal.ship(target.resolve(inv, server))


@task(name="pitr-retention", task_run_name="retention-{server}", timeout_seconds=1800,
      cache_policy=NO_CACHE, **RETRY)
def apply_retention(inv: Inventory, server: str) -> retention.RetentionPlan:
    """Forget base backups beyond the policy and only the WAL no kept one needs."""
    return retention.apply(target.resolve(inv, server, match_client=False))


@task(name="pitr-lag", task_run_name="lag-{server}", timeout_seconds=300,
      cache_policy=NO_CACHE)
def lag_report(inv: Inventory, server: str) -> dict[str, Any]:
    """Receive/ship lag and slot retention, with warnings."""
    facts, warnings = lag.report(target.resolve(inv, server))
    logger = get_run_logger()
    for w in warnings:
        logger.warning(w)
    return {**facts.to_dict(), "warnings": warnings}


@task(name="pitr-drill", task_run_name="pitr-drill-{server}", timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE)
def pitr_drill(inv: Inventory, server: str, seed: int | None = None) -> drill.PitrDrillResult:
    """Restore for real to a random moment and to the newest, in scratch clusters;
    then to each newest dump's WAL LSN, its row counts compared with its manifest."""
    dumps = crosscheck.newest_dumps(inv, server)
    return drill.run_drill(target.resolve(inv, server, match_client=False), seed=seed,
                           dumps=dumps)


# -- restoring one database onto the live server (runbook pitr-restore-database) --------

@task(name="pitr-live-copy", task_run_name="pitr-copy-{database}", timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE)
def live_copy(inv: Inventory, server: str, database: str, to: str) -> dict[str, Any]:
    """Recover the server to ``to`` in a scratch cluster here, copy the database onto the
    live server as ``<db>_pitr_<stamp>``; the scratch cluster is removed."""
    return pitr_copy.live_copy(inv, server, database, to).outputs()


@task(name="pitr-compare-copy", task_run_name="pitr-compare-{copy_db}", timeout_seconds=3600,
      cache_policy=NO_CACHE)
def compare_copy(inv: Inventory, database: str, copy_db: str) -> dict[str, Any]:
    """Row counts of the copy against the live database now (read-only)."""
    return pitr_copy.compare_copy(inv, database, copy_db)


@task(name="pitr-swap-copy", task_run_name="pitr-swap-{copy_db}", timeout_seconds=600,
      cache_policy=NO_CACHE)
def swap_copy(inv: Inventory, database: str, copy_db: str) -> dict[str, Any]:
    """The copy in place of the database; the original kept as ``<db>_before_pitr_*``."""
    return {"aside": pitr_copy.swap_in(inv, database, copy_db)}


@task(name="pitr-swap-back", task_run_name="pitr-swap-back-{copy_db}", timeout_seconds=600,
      cache_policy=NO_CACHE)
def swap_back(inv: Inventory, database: str, copy_db: str) -> dict[str, Any]:
    """Undo the swap: the original under its name again."""
    return {"detail": pitr_copy.swap_back(inv, database, copy_db)}


@task(name="pitr-drop-copy", task_run_name="pitr-drop-{copy_db}", timeout_seconds=600,
      cache_policy=NO_CACHE)
def drop_copy(inv: Inventory, database: str, copy_db: str) -> dict[str, Any]:
    """Drop a copy that was not swapped in."""
    return {"dropped": pitr_copy.drop_copy(inv, database, copy_db)}
