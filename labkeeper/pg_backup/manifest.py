"""The manifest stored with each dump: what the dump contains (exact row counts,
sizes, versions, the WAL position), read in the dump's own database snapshot, so a
drill can prove a restore complete.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

from labkeeper import postgres

MANIFEST_FORMAT = 1
LABKEEPER_VERSION = "0.1.0"


def _labkeeper_version() -> str:
    try:
        from importlib.metadata import version

        return version("labkeeper")
    except Exception:
        return LABKEEPER_VERSION



class TableCount(BaseModel):
    model_config = ConfigDict(extra="ignore")

    schema_name: str
    name: str
    rows: int


class DumpInfo(BaseModel):
    model_config = ConfigDict(extra="ignore")

    filename: str
    path: str
    bytes: int
    snapshot_id: str
    """The dump snapshot's full id (restic 0.14's short one in manifests written before
    ids were canonical: compare with :func:`labkeeper.restic.same_id`)."""
    duration_s: float
    data_added: int
    """restic's ``data_added`` (uncompressed in restic 0.14)."""


class Manifest(BaseModel):
    """What the dump contains, read in the dump's own snapshot. Stored as
    ``<db>.manifest.json`` in a companion snapshot with the same ``backup:`` tag."""

    model_config = ConfigDict(extra="ignore")

    format: int = MANIFEST_FORMAT
    backup_id: str
    lab: str
    database: str
    server: str
    dbname: str
    created_at: datetime
    pg_snapshot: str
    server_version: str
    database_size: int
    dump_format: str
    compression: str
    pg_dump_version: str
    labkeeper_version: str
    tables: list[TableCount]
    dump: DumpInfo | None = None
    wal_lsn: str | None = None
    """The WAL insert position read with the snapshot
    (:data:`labkeeper.postgres.SNAPSHOT_LSN_SQL`): a point-in-time restore to it
    reproduces these row counts (the PITR drill compares). None in manifests written
    before it was recorded, and for a dump taken on a standby."""

    @property
    def table_count(self) -> int:
        return len(self.tables)

    @property
    def total_rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def to_json(self) -> bytes:
        data = self.model_dump(mode="json")
        data["table_count"] = self.table_count
        data["total_rows"] = self.total_rows
        return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def build_manifest(*, backup_id: str, lab: str, database: str, server: str, dbname: str,
                   facts: postgres.SnapshotFacts, dump_format: str, compression: str,
                   pg_dump_version: str, now: datetime | None = None) -> Manifest:
    return Manifest(
        backup_id=backup_id, lab=lab, database=database, server=server, dbname=dbname,
        created_at=now or datetime.now(tz=UTC), pg_snapshot=facts.snapshot_id,
        server_version=facts.server_version, database_size=facts.database_size,
        dump_format=dump_format, compression=compression, pg_dump_version=pg_dump_version,
        labkeeper_version=_labkeeper_version(),
        tables=[TableCount(schema_name=s, name=t, rows=n) for s, t, n in facts.tables],
        wal_lsn=facts.wal_lsn or None,
    )


def parse_manifest(text: str) -> Manifest:
    return Manifest.model_validate_json(text)

