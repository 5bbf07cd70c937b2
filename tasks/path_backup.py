"""File backup steps as Prefect tasks (thin wrappers over labkeeper.path_backup)."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from labkeeper import path_backup
from labkeeper.inventory import Inventory
from tasks.common import RETRY

# The outer bound; restic itself is bounded by the path set's timeout_minutes (a remote
# deadline too) and every SSH command by its own timeout.
BACKUP_TASK_TIMEOUT = 25 * 3600


@task(name="path-backup", task_run_name="backup-{name}",
      timeout_seconds=BACKUP_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def backup_path_set(inv: Inventory, name: str) -> path_backup.PathBackupResult:
    """restic backup of one path set, run on its host over SSH, proven by its tag."""
    return path_backup.backup_path_set(inv, name)
