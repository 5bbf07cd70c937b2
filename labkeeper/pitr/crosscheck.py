"""Cross-check point-in-time recovery with the nightly dumps.

Each dump's manifest records the WAL insert position read with its snapshot
(``wal_lsn``, :data:`labkeeper.postgres.SNAPSHOT_LSN_SQL`). When the PITR archive can
reach that LSN (a base backup that ended at or before it, WAL shipped past it), the
drill restores the server to exactly that LSN (``recovery_target_inclusive = off``)
and counts every table of the dumped database: the counts must equal the manifest's.
A transaction that committed between the snapshot and the LSN read makes them differ;
the drill then says so, naming the tables (status ``warn``), rather than pass
silently. A dump whose LSN the archive cannot reach (older manifests, a dump before
the oldest base backup, WAL not shipped yet) is listed as ``skipped`` with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from labkeeper import pg_backup, postgres
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Inventory
from labkeeper.inventory.pitr import pitr_database, pitr_server
from labkeeper.pitr import models
from labkeeper.pitr.target import StoredBase

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DumpRef:
    """The newest complete dump of one database on a PITR server, with its manifest."""

    database: str
    manifest: pg_backup.Manifest

    @property
    def label(self) -> str:
        return f"dump {self.database} {self.manifest.backup_id}"


def infeasible(manifest: pg_backup.Manifest, bases: Sequence[StoredBase],
               covered: datetime | None) -> str | None:
    """Why a PITR restore to the dump's LSN is not possible (pure); None when it is:
    the manifest records an LSN, a complete base backup ended at or before it, and the
    archive provably reaches past the dump's snapshot (a ship's ``walto:`` mark at or
    after the manifest's time: that ship switched WAL after the LSN)."""
    if not manifest.wal_lsn:
        return ("its manifest records no WAL LSN (written before labkeeper recorded it, "
                "or dumped from a standby)")
    try:
        want = models.parse_lsn(manifest.wal_lsn)
    except ValueError:
        return f"its manifest's WAL LSN {manifest.wal_lsn!r} is not an LSN"
    if not any(models.parse_lsn(b.end_lsn) <= want for b in bases):
        oldest = f"the oldest ends at {bases[0].end_lsn}" if bases else "there is none"
        return f"no base backup ended before its LSN {manifest.wal_lsn} ({oldest})"
    if covered is None or covered < manifest.created_at:
        reach = covered.isoformat() if covered else "nowhere yet"
        return (f"the archived WAL does not reach its LSN {manifest.wal_lsn} yet (covered "
                f"until {reach}, dump snapshot {manifest.created_at.isoformat()})")
    return None


def differences(tables: Sequence[pg_backup.TableCount],
                restored: dict[tuple[str, str], int]) -> list[str]:
    """How the restored counts differ from the manifest's (pure); empty when they agree."""
    out: list[str] = []
    listed = {(t.schema_name, t.name) for t in tables}
    for t in tables:
        got = restored.get((t.schema_name, t.name))
        if got is None:
            out.append(f"{t.schema_name}.{t.name} missing (dump: {t.rows} rows)")
        elif got != t.rows:
            out.append(f"{t.schema_name}.{t.name} {got} rows (dump: {t.rows}, "
                       f"{got - t.rows:+d})")
    out += [f"{s}.{n} exists (not in the dump)" for s, n in sorted(set(restored) - listed)]
    return out


def judge(ref: DumpRef, restored: dict[tuple[str, str], int]) -> tuple[str, str]:
    """``(status, detail)`` of one cross-check (pure): ``ok`` when every count agrees,
    ``warn`` naming the tables when they differ."""
    m = ref.manifest
    diff = differences(m.tables, restored)
    if not diff:
        return "ok", (f"restore to its LSN {m.wal_lsn} agrees with {ref.label}: "
                      f"{m.table_count} table(s), {m.total_rows} rows")
    return "warn", (f"restore to its LSN {m.wal_lsn} differs from {ref.label} in "
                    f"{len(diff)} table(s): {'; '.join(diff)} (transactions committed "
                    "between the dump's snapshot and its LSN, or a fault in one of the "
                    "backups)")


TABLES_SQL = postgres.TABLES_SQL.rstrip().rstrip(";") + ";"


def counts_sql(tables: Sequence[tuple[str, str]]) -> str:
    return postgres.row_counts_sql(list(tables)) + ";"


def same_server(inv: Inventory, name: str) -> list[str]:
    """The ``databases:`` entries on PITR server ``name``'s PostgreSQL server (its
    database's server label and port)."""
    db = pitr_database(inv, pitr_server(inv, name))
    key = (inv.database_server(db), db.port)
    return [d.name for d in inv.databases if (inv.database_server(d), d.port) == key]


def newest_dumps(inv: Inventory, name: str) -> list[DumpRef]:
    """The newest complete dump (with its manifest) of each database on the server;
    a database whose dumps cannot be read is logged and left out."""
    out: list[DumpRef] = []
    for db_name in same_server(inv, name):
        db = inv.database(db_name)
        try:
            repo = pg_backup.open_repo(inv, inv.repository_for(db).name)
            backup = pg_backup.find_latest_backup(repo, lab=inv.lab.name,
                                                  server=inv.database_server(db), name=db_name)
            if backup is not None:
                out.append(DumpRef(db_name, pg_backup.read_manifest(repo, backup)))
        except LabkeeperError as exc:
            logger.warning("%s: cannot read the newest dump manifest of %s: %s", name, db_name,
                           exc)
    return out
