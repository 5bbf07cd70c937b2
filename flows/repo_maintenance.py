"""Repository maintenance: forget per series with the inventory's retention, prune,
check a subset of the data, and report the bucket's usage and cost.

restic's cache lives in a persistent directory per repository
(``repositories[].cache_dir`` or ``settings.cache_dir/<name>``): B2 bills list and
download calls, and a cold cache on every run multiplies them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from labkeeper.inventory import load_inventory
from labkeeper.run_report.repo_maintenance import RepoMaintenanceReport
from tasks import repo_maintenance as mt
from tasks.common import lab_path
from tasks.hooks import hooks


@flow(name="repo_maintenance", log_prints=False, timeout_seconds=12 * 3600,
      **hooks("repo_maintenance"))
def repo_maintenance_flow(lab: str | None = None, repository: str | None = None,
                          dry_run: bool = False, prune: bool = True, check: bool = True,
                          read_data_subset: str | None = None) -> dict[str, Any]:
    """forget (per series) → prune → check → usage, for one or every repository.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        repository: Only this restic repository (its name in the inventory); empty:
            every repository.
        dry_run: Show what forget and prune would remove, changing nothing.
        prune: Prune after forget (free the space of forgotten snapshots).
        check: Check the repository's integrity afterwards (restic check).
        read_data_subset: Also read back this part of the data while checking (restic's
            --read-data-subset, e.g. 1/12 or 5%); empty: structure only.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    names = [repository] if repository else [r.name for r in inv.repositories]
    for n in names:
        inv.repository(n)
    report: dict[str, Any] = {}
    artifacts = RepoMaintenanceReport(inv, "repo-maintenance", logger)
    for name in names:
        rows = mt.forget(inv, name, dry_run=dry_run)
        entry: dict[str, Any] = {"forget": rows}
        if prune:
            entry["prune"] = mt.prune(inv, name, dry_run=dry_run)
        if check and not dry_run:
            entry["check"] = mt.check(inv, name, read_data_subset=read_data_subset)
        entry["usage"] = mt.usage(inv, name)
        report[name] = entry
        artifacts.repository(name, entry, dry_run=dry_run)
    return report


if __name__ == "__main__":
    repo_maintenance_flow()
