"""Repository maintenance steps as Prefect tasks: forget per series, prune, check, usage."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper import b2, path_backup, pg_backup, restic
from labkeeper.doctor import s3_target_for
from labkeeper.inventory import Inventory
from tasks.common import RETRY


def _ready(inv: Inventory, repo_name: str) -> restic.Repo:
    """Open the repository and get an exclusive lock's way clear (stale locks removed,
    live ones waited for)."""
    logger = get_run_logger()
    cfg = inv.repository(repo_name)
    repo = pg_backup.open_repo(inv, repo_name)
    restic.wait_for_locks(repo, exclusive=True, wait=cfg.lock_wait_minutes * 60,
                          stale_after=cfg.stale_lock_minutes * 60, log=logger.info)
    return repo


@task(name="repo-forget", task_run_name="forget-{repo_name}", timeout_seconds=3600,
      cache_policy=NO_CACHE, **RETRY)
def forget(inv: Inventory, repo_name: str, dry_run: bool = False) -> list[dict[str, Any]]:
    """``restic forget`` per series with the repository's retention; then the manifests
    whose dump is gone. One row per snapshot: kept or removed (would be, in dry-run)."""
    logger = get_run_logger()
    repo = _ready(inv, repo_name)
    keep = inv.repository(repo_name).retention.restic_args()
    verb = "would remove" if dry_run else "removed"
    rows: list[dict[str, Any]] = []
    plan = [(series, keep) for series in pg_backup.retention_series(inv, repo_name)]
    plan += [(series, inv.retention_for(pb).restic_args())
             for series, pb in zip(path_backup.retention_series(inv, repo_name),
                                   [pb for pb in inv.path_backups
                                    if inv.repository_for(pb).name == repo_name],
                                   strict=True)]
    for series, keep in plan:
        groups = restic.forget_policy(repo, keep=keep, host=series.host, tags=series.tags,
                                      dry_run=dry_run)
        kept = [s for g in groups for s in (g.keep or [])]
        gone = [s for g in groups for s in (g.remove or [])]
        logger.info("%s: keep %d, %s %d (%s)", series.label, len(kept), verb, len(gone),
                    " ".join(keep))
        rows += [{"series": series.label, "snapshot": s.short_id or s.id[:8],
                  "time": s.time.isoformat(timespec="seconds"), "action": "keep"}
                 for s in kept]
        rows += [{"series": series.label, "snapshot": s.short_id or s.id[:8],
                  "time": s.time.isoformat(timespec="seconds"), "action": verb}
                 for s in gone]
    snaps = restic.find_snapshots(repo, tags=["labkeeper"], host=inv.lab.name)
    removed = {r["snapshot"] for r in rows if r["action"] != "keep"}
    # in a dry run the dumps are still there: judge manifests against what would remain
    remaining = [s for s in snaps if (s.short_id or s.id[:8]) not in removed]
    orphans = pg_backup.orphan_manifests(remaining)
    if orphans:
        if not dry_run:
            restic.forget_ids(repo, [s.id for s in orphans])
        logger.info("manifests whose dump is gone: %s %d", verb, len(orphans))
        rows += [{"series": "manifests", "snapshot": s.short_id or s.id[:8],
                  "time": s.time.isoformat(timespec="seconds"), "action": verb}
                 for s in orphans]
    return rows


@task(name="repo-prune", task_run_name="prune-{repo_name}", timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def prune(inv: Inventory, repo_name: str, dry_run: bool = False) -> str:
    """``restic prune``: remove the data no snapshot references any more."""
    out = restic.prune(_ready(inv, repo_name), dry_run=dry_run)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return "\n".join(lines[-6:])


@task(name="repo-check", task_run_name="check-{repo_name}", timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def check(inv: Inventory, repo_name: str, read_data_subset: str | None = None) -> str:
    """``restic check`` with ``--read-data-subset`` (the repository's policy by default)."""
    subset = read_data_subset or inv.repository(repo_name).check.read_data_subset
    out = restic.check(_ready(inv, repo_name), read_data_subset=subset)
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return "\n".join(lines[-3:])


@task(name="repo-usage", task_run_name="usage-{repo_name}", timeout_seconds=600,
      cache_policy=NO_CACHE, **RETRY)
def usage(inv: Inventory, repo_name: str) -> dict[str, Any] | None:
    """Objects, bytes, monthly cost, versioning and object lock of the bucket."""
    cfg = inv.repository(repo_name)
    if cfg.s3 is None:
        return None
    u = b2.usage(s3_target_for(inv, repo_name),
                 prefix=b2.repository_prefix(cfg.url, cfg.s3.bucket),
                 storage_per_tb_month=cfg.pricing.storage_per_tb_month,
                 currency=cfg.pricing.currency)
    return u.row()
