"""PITR steps as Prefect tasks (thin wrappers over labkeeper.pitr)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper.inventory import Inventory
from labkeeper.pitr import basebackup, crosscheck, drill, lag, retention, target, wal
from tasks.common import RETRY


@task(name="pitr-base-backup", task_run_name="base-backup-{server}",
      timeout_seconds=6 * 3600, cache_policy=NO_CACHE, **RETRY)
def base_backup(inv: Inventory, server: str) -> basebackup.BaseBackupResult:
    """pg_basebackup streamed into restic, proven complete, LSN range recorded."""
    logger = get_run_logger()
    return basebackup.run_base_backup(target.resolve(inv, server), log=logger.info)


@task(name="pitr-ship-wal", task_run_name="ship-wal-{server}", timeout_seconds=3600,
      cache_policy=NO_CACHE, **RETRY)
def ship_wal(inv: Inventory, server: str) -> wal.ShipResult:
    """Completed spool segments into restic in one run; removed once verified there."""
    logger = get_run_logger()
    return wal.ship(target.resolve(inv, server), log=logger.info)


@task(name="pitr-retention", task_run_name="retention-{server}", timeout_seconds=1800,
      cache_policy=NO_CACHE, **RETRY)
def apply_retention(inv: Inventory, server: str) -> retention.RetentionPlan:
    """Forget base backups beyond the policy and only the WAL no kept one needs."""
    logger = get_run_logger()
    return retention.apply(target.resolve(inv, server, match_client=False), log=logger.info)


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
    logger = get_run_logger()
    dumps = crosscheck.newest_dumps(inv, server, log=logger.warning)
    return drill.run_drill(target.resolve(inv, server, match_client=False), log=logger.info,
                           seed=seed, dumps=dumps)
