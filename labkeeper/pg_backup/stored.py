"""Stored backups as the rest of labkeeper reads them: only a dump whose manifest is
stored counts (status, drills, restores), leftovers of failed attempts are told
apart from backups in flight, and the retention series of a repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from labkeeper import restic
from labkeeper.inventory import Inventory
from labkeeper.pg_backup.manifest import Manifest, parse_manifest
from labkeeper.pg_backup.naming import backup_id_of, globals_tags, series_tags
from labkeeper.pg_backup.results import BackupFailed
from labkeeper.pg_backup.targets import server_label

INCOMPLETE_GRACE_S = 25 * 60
"""Beyond the database's ``timeout_minutes``: how long after its dump snapshot's time a
backup may still store its manifest (row counts 600 s, manifest 300 s, a replacement
manifest restic 300 s, margin). A dump without a manifest older than that is a
leftover of a failed attempt, never a backup in flight."""

def manifested_ids(snapshots: list[restic.Snapshot]) -> set[str]:
    """The backup ids that have a manifest snapshot among ``snapshots``."""
    return {bid for s in snapshots if "kind:pg_manifest" in s.tags
            and (bid := backup_id_of(s)) is not None}


def complete_dumps(snapshots: list[restic.Snapshot]) -> list[restic.Snapshot]:
    """The dump snapshots that are backups: their manifest (same ``backup:`` tag) is
    stored. A dump without one is the leftover of a failed attempt (or one in flight)
    and never counts."""
    done = manifested_ids(snapshots)
    return [s for s in snapshots if "kind:pg_dump" in s.tags and backup_id_of(s) in done]


def incomplete_dumps(snapshots: list[restic.Snapshot], *, now: datetime, grace_s: float,
                     failed: set[str] | frozenset[str] = frozenset()
                     ) -> tuple[list[restic.Snapshot], list[restic.Snapshot]]:
    """Dump snapshots without a manifest, split into (leftovers: recorded as failed in
    ``failed`` or older than ``grace_s``; young: possibly a backup still in flight)."""
    done = manifested_ids(snapshots)
    leftovers: list[restic.Snapshot] = []
    young: list[restic.Snapshot] = []
    for s in snapshots:
        bid = backup_id_of(s)
        if "kind:pg_dump" not in s.tags or bid in done:
            continue
        old = (now - s.time).total_seconds() > grace_s
        (leftovers if old or bid in failed else young).append(s)
    return leftovers, young



# -- for the DR drill: find a backup and its manifest ------------------------------------

@dataclass(frozen=True)
class StoredBackup:
    dump: restic.Snapshot
    manifest: restic.Snapshot | None
    backup_id: str


def find_backups(repo: restic.Repo, *, lab: str, server: str, name: str,
                 timeout: float = 120) -> list[StoredBackup]:
    """Every complete backup of one database's series, oldest first (dump snapshots
    paired with their manifest snapshot by ``backup:`` tag)."""
    snaps = restic.find_snapshots(repo, tags=["labkeeper", f"db:{server}/{name}"], host=lab,
                                  timeout=timeout)
    manifests = {backup_id_of(s): s for s in snaps if "kind:pg_manifest" in s.tags}
    out = []
    for s in snaps:
        bid = backup_id_of(s)
        if "kind:pg_dump" in s.tags and bid:
            out.append(StoredBackup(dump=s, manifest=manifests.get(bid), backup_id=bid))
    return out


def find_latest_backup(repo: restic.Repo, *, lab: str, server: str, name: str
                       ) -> StoredBackup | None:
    """The newest dump of the series that has its manifest."""
    complete = [b for b in find_backups(repo, lab=lab, server=server, name=name) if b.manifest]
    return complete[-1] if complete else None


def read_manifest(repo: restic.Repo, backup: StoredBackup) -> Manifest:
    if backup.manifest is None:
        raise BackupFailed(f"backup {backup.backup_id} has no manifest snapshot")
    path = backup.manifest.paths[0] if backup.manifest.paths else ""
    return parse_manifest(restic.dump_file(repo, backup.manifest.id, path))


# -- retention series (repo maintenance) -------------------------------------------------

@dataclass(frozen=True)
class Series:
    """One retention series: the lab's snapshots carrying all of ``tags``."""

    label: str
    host: str
    tags: tuple[str, ...]


def retention_series(inv: Inventory, repo_name: str) -> list[Series]:
    """The dump series of every database in a repository, and each server's globals.
    Manifests are not a series: they follow their dumps (:func:`orphan_manifests`)."""
    out: list[Series] = []
    seen: set[str] = set()
    for db in inv.databases:
        if inv.repository_for(db).name != repo_name:
            continue
        server = inv.database_server(db)
        out.append(Series(f"db:{server}/{db.name}", inv.lab.name,
                          tuple(series_tags(server, db.name))))
        label = server_label(inv, db)
        if db.globals and label not in seen:
            seen.add(label)
            out.append(Series(f"globals:{label}", inv.lab.name, tuple(globals_tags(label))))
    return out


def orphan_manifests(snapshots: list[restic.Snapshot]) -> list[restic.Snapshot]:
    """Manifest snapshots whose dump snapshot (same ``backup:`` tag) is gone."""
    dumps = {backup_id_of(s) for s in snapshots if "kind:pg_dump" in s.tags}
    return [s for s in snapshots
            if "kind:pg_manifest" in s.tags and backup_id_of(s) not in dumps]

