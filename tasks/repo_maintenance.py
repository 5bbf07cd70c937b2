"""Repository maintenance steps as Prefect tasks: forget per series, prune, check, usage."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper import b2, path_backup, pg_backup, restic
from labkeeper.doctor import s3_target_for
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Inventory
from tasks.common import RETRY


def _ready(inv: Inventory, repo_name: str) -> restic.Repo:
    """Open the repository and get an exclusive lock's way clear (stale locks removed,
    live ones waited for)."""
    cfg = inv.repository(repo_name)
    repo = pg_backup.open_repo(inv, repo_name)
    restic.wait_for_locks(repo, exclusive=True, wait=cfg.lock_wait_minutes * 60,
                          stale_after=cfg.stale_lock_minutes * 60)
    return repo


def _row(label: str, s: restic.Snapshot, action: str) -> dict[str, Any]:
    """One forget row: the full snapshot id (matched on), and its short form (shown)."""
    return {"series": label, "snapshot": s.id[:8], "id": s.id,
            "time": s.time.isoformat(timespec="seconds"), "action": action}


def _failed_ids(inv: Inventory, name: str, log: Any) -> set[str]:
    """Backup ids of the database's failed attempts recorded as pending cleanup."""
    try:
        return {a.backup_id for a in pg_backup.pending_store(inv, name).read()}
    except LabkeeperError as exc:  # the backup of that database reports it too
        log(f"{name}: pending cleanups not read: {exc}")
        return set()


def incomplete_by_series(inv: Inventory, repo_name: str, snaps: list[restic.Snapshot], *,
                         now: datetime, log: Any
                         ) -> tuple[list[tuple[str, restic.Snapshot]], set[str]]:
    """Per database series of the repository: its dumps without a manifest that are
    leftovers of failed attempts (recorded as pending, or older than the database's
    timeout plus :data:`pg_backup.INCOMPLETE_GRACE_S`), and the labels of the series
    holding a younger one (maybe a backup in flight: their policy waits a run)."""
    leftovers: list[tuple[str, restic.Snapshot]] = []
    busy: set[str] = set()
    for db in inv.databases:
        if inv.repository_for(db).name != repo_name:
            continue
        label = f"db:{inv.database_server(db)}/{db.name}"
        mine = [s for s in snaps if label in s.tags]
        old, young = pg_backup.incomplete_dumps(
            mine, now=now, grace_s=db.timeout_minutes * 60 + pg_backup.INCOMPLETE_GRACE_S,
            failed=_failed_ids(inv, db.name, log))
        leftovers += [(label, s) for s in old]
        if young:
            busy.add(label)
    return leftovers, busy


@task(name="repo-forget", task_run_name="forget-{repo_name}", timeout_seconds=3600,
      cache_policy=NO_CACHE, **RETRY)
def forget(inv: Inventory, repo_name: str, dry_run: bool = False) -> list[dict[str, Any]]:
    """``restic forget`` per series with the repository's retention; then the manifests
    whose dump is gone. One row per snapshot: kept or removed (would be, in dry-run).

    A database dump without its manifest is never counted as a backup: leftovers of
    failed attempts are forgotten *before* the policy runs (so a leftover can never be
    kept instead of that day's complete backup), and a series holding a young one (a
    backup may be in flight) keeps everything this run."""
    logger = get_run_logger()
    repo = _ready(inv, repo_name)
    keep = inv.repository(repo_name).retention.restic_args()
    verb = "would remove" if dry_run else "removed"
    rows: list[dict[str, Any]] = []
    snaps = restic.find_snapshots(repo, tags=["labkeeper"], host=inv.lab.name)
    leftovers, busy = incomplete_by_series(inv, repo_name, snaps, now=datetime.now(tz=UTC),
                                           log=logger.warning)
    if leftovers:
        if not dry_run:
            restic.forget_ids(repo, [s.id for _label, s in leftovers])
        logger.info("dumps without a manifest (failed attempts): %s %d", verb, len(leftovers))
        rows += [_row(label, s, f"{verb} (no manifest)") for label, s in leftovers]
    plan = [(series, keep) for series in pg_backup.retention_series(inv, repo_name)]
    plan += [(series, inv.retention_for(pb).restic_args())
             for series, pb in zip(path_backup.retention_series(inv, repo_name),
                                   [pb for pb in inv.path_backups
                                    if inv.repository_for(pb).name == repo_name],
                                   strict=True)]
    for series, keep in plan:
        if series.label in busy:
            logger.warning("%s: a dump without its manifest is younger than the database's "
                           "timeout (a backup may be in flight): retention skipped this run",
                           series.label)
            continue
        groups = restic.forget_policy(repo, keep=keep, host=series.host, tags=series.tags,
                                      dry_run=dry_run)
        kept = [s for g in groups for s in (g.keep or [])]
        gone = [s for g in groups for s in (g.remove or [])]
        logger.info("%s: keep %d, %s %d (%s)", series.label, len(kept), verb, len(gone),
                    " ".join(keep))
        rows += [_row(series.label, s, "keep") for s in kept]
        rows += [_row(series.label, s, verb) for s in gone]
    removed = {r["id"] for r in rows if r["action"] != "keep"}
    # in a dry run the dumps are still there: judge manifests against what would remain
    orphans = pg_backup.orphan_manifests([s for s in snaps if s.id not in removed])
    if orphans:
        if not dry_run:
            restic.forget_ids(repo, [s.id for s in orphans])
        logger.info("manifests whose dump is gone: %s %d", verb, len(orphans))
        rows += [_row("manifests", s, verb) for s in orphans]
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
