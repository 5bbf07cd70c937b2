"""Nightly PostgreSQL backups: pg_dump streamed into restic, proven complete, with a
manifest of what the dump holds.

One database (:func:`backup_database`, :mod:`.database`): the database snapshot's
dump streamed into ``restic backup --stdin`` with end-of-stream owned by labkeeper,
the manifest (:mod:`.manifest`) stored beside it, nothing of a failed attempt left
counted (:mod:`.cleanup`), its restic maybe started ahead of the run (:mod:`.ahead`).
A server's roles and tablespaces (:func:`backup_globals`, :mod:`.server_globals`).
How snapshots are named (:mod:`.naming`), which count as backups and the retention
series (:mod:`.stored`), connections (:mod:`.targets`), results and errors
(:mod:`.results`).

Format (measured, ``benchmarks/``): plain ``pg_dump`` + restic ``--compression
auto`` uploads the least on a typical night; gzip/``-Fc`` zlib defeat dedup.
"""

from labkeeper.errors import LabkeeperError
from labkeeper.pg_backup import (
    ahead,
    cleanup,
    database,
    manifest,
    naming,
    results,
    server_globals,
    stored,
    targets,
)
from labkeeper.pg_backup.ahead import AHEAD_EXPIRES, started_ahead
from labkeeper.pg_backup.cleanup import (
    CLEANUP_TIMEOUT,
    PENDING_DIR,
    discard_attempt,
    pending_owner,
    pending_store,
    record_pending,
    sweep_pending,
)
from labkeeper.pg_backup.database import (
    LOCK_HANDOFF_TIMEOUT,
    MANIFEST_NICE,
    MANIFEST_PREFIX,
    MAX_LOCK_CONFLICTS,
    backup_database,
)
from labkeeper.pg_backup.manifest import (
    LABKEEPER_VERSION,
    MANIFEST_FORMAT,
    DumpInfo,
    Manifest,
    TableCount,
    build_manifest,
    parse_manifest,
)
from labkeeper.pg_backup.naming import (
    backup_id_of,
    backup_tag,
    dump_filename,
    globals_tags,
    manifest_filename,
    new_backup_id,
    series_tags,
)
from labkeeper.pg_backup.results import BackupFailed, BackupResult, GlobalsResult
from labkeeper.pg_backup.server_globals import backup_globals, globals_servers
from labkeeper.pg_backup.stored import (
    INCOMPLETE_GRACE_S,
    Series,
    StoredBackup,
    complete_dumps,
    find_backups,
    find_latest_backup,
    incomplete_dumps,
    manifested_ids,
    orphan_manifests,
    read_manifest,
    retention_series,
)
from labkeeper.pg_backup.targets import client_conn, conn_for, server_label
from labkeeper.restic.repository import open_repo, repo_cache_dir

__all__ = [
    "AHEAD_EXPIRES", "CLEANUP_TIMEOUT", "INCOMPLETE_GRACE_S", "LABKEEPER_VERSION",
    "LOCK_HANDOFF_TIMEOUT",
    "MANIFEST_FORMAT", "MANIFEST_NICE", "MANIFEST_PREFIX", "MAX_LOCK_CONFLICTS",
    "PENDING_DIR", "BackupFailed", "BackupResult", "DumpInfo", "GlobalsResult",
    "LabkeeperError", "Manifest", "Series", "StoredBackup", "TableCount",
    "ahead", "backup_database", "backup_globals", "backup_id_of", "backup_tag", "build_manifest",
    "cleanup", "client_conn", "complete_dumps", "conn_for", "database", "discard_attempt",
    "dump_filename", "find_backups", "find_latest_backup", "globals_servers",
    "globals_tags", "incomplete_dumps", "manifest", "manifest_filename", "manifested_ids",
    "naming", "new_backup_id", "open_repo", "orphan_manifests", "parse_manifest",
    "pending_owner", "pending_store", "read_manifest", "record_pending", "repo_cache_dir",
    "results", "retention_series", "series_tags", "server_globals", "server_label",
    "started_ahead", "stored", "sweep_pending", "targets",
]
