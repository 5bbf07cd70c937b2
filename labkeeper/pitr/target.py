"""Where one PITR server's base backups and WAL go: the inventory resolved at run time.

Secrets (the database password, the repository's keys) are resolved here, inside the
run, from the inventory's references; they reach child processes only through their
environment (:meth:`labkeeper.postgres.Conn.env`, :meth:`labkeeper.restic.Repo.env`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from labkeeper import pg_backup, postgres, restic
from labkeeper.inventory import Inventory
from labkeeper.inventory.pitr import (
    PitrServer,
    pitr_database,
    pitr_repository,
    pitr_server,
    spool_dir,
)
from labkeeper.pitr import models


@dataclass(frozen=True)
class PitrTarget:
    server: PitrServer
    conn: postgres.Conn
    repo: restic.Repo
    compression: str
    host: str
    """The lab's name: restic ``--host`` of every snapshot."""
    spool: Path
    lock_wait_s: float
    stale_lock_s: float
    state_dir: Path | None = None
    """``settings.state_dir``: base backups' pending-cleanup records (None: none kept)."""

    @property
    def name(self) -> str:
        return self.server.name


def resolve(inv: Inventory, name: str, *, match_client: bool = True) -> PitrTarget:
    """The target of pitr server ``name``. ``match_client``: pick the installed client
    tools matching the server's major version (asks the server; off for offline use)."""
    server = pitr_server(inv, name)
    db = pitr_database(inv, server)
    repo_cfg = pitr_repository(inv, server)
    conn = (pg_backup.client_conn(inv, db) if match_client
            else pg_backup.conn_for(inv, db))
    return PitrTarget(server=server, conn=conn, repo=pg_backup.open_repo(inv, repo_cfg.name),
                      compression=repo_cfg.compression, host=inv.lab.name,
                      spool=spool_dir(inv, server),
                      lock_wait_s=repo_cfg.lock_wait_minutes * 60.0,
                      stale_lock_s=repo_cfg.stale_lock_minutes * 60.0,
                      state_dir=Path(inv.settings.state_dir))


# -- what the repository holds (one `restic snapshots` each) -----------------------------

@dataclass(frozen=True)
class StoredBase:
    """A complete base backup: the tar snapshot and its info snapshot (same ``backup:``)."""

    backup_id: str
    base: restic.Snapshot
    info: restic.Snapshot
    timeline: int
    start_lsn: str
    end_lsn: str

    @property
    def finished_at(self) -> datetime:
        """The info snapshot's time: after pg_basebackup exited."""
        return self.info.time

    @property
    def start_segment(self) -> str:
        return models.segment_of_lsn(self.timeline, models.parse_lsn(self.start_lsn))

    @property
    def end_segment_name(self) -> str:
        return models.segment_of_lsn(self.timeline, models.parse_lsn(self.end_lsn))

    @property
    def major(self) -> int | None:
        for t in self.info.tags:
            if t.startswith("pgmajor:") and t[8:].isdigit():
                return int(t[8:])
        return None


@dataclass(frozen=True)
class StoredWal:
    snapshot: restic.Snapshot
    first: str
    last: str


def lsn_range_tag(timeline: int, start_lsn: str, end_lsn: str) -> str:
    return f"walrange:{timeline}:{start_lsn}:{end_lsn}"


def parse_range_tag(tags: list[str]) -> tuple[int, str, str] | None:
    for t in tags:
        parts = t.split(":")
        if len(parts) == 4 and parts[0] == "walrange" and parts[1].isdigit():
            return int(parts[1]), parts[2], parts[3]
    return None


def complete_bases(snapshots: list[restic.Snapshot]) -> list[StoredBase]:
    """Base backups whose info snapshot is stored, oldest first (pure). A tar without
    its info is a failed attempt's leftover (or one in flight) and never counts."""
    infos = {pg_backup.backup_id_of(s): s for s in snapshots
             if "kind:basebackup_info" in s.tags}
    out: list[StoredBase] = []
    for s in sorted(snapshots, key=lambda s: s.time):
        bid = pg_backup.backup_id_of(s)
        info = infos.get(bid)
        if "kind:basebackup" not in s.tags or bid is None or info is None:
            continue
        rng = parse_range_tag(info.tags)
        if rng is not None:
            out.append(StoredBase(bid, s, info, *rng))
    return out


def wal_batches(snapshots: list[restic.Snapshot]) -> list[StoredWal]:
    out = []
    for s in snapshots:
        rng = models.wal_range_of(s.tags) if "kind:wal" in s.tags else None
        if rng is not None:
            out.append(StoredWal(s, *rng))
    return sorted(out, key=lambda w: (models.parse_segment(w.first)[1], w.snapshot.time))


def coverage(snapshots: list[restic.Snapshot]) -> datetime | None:
    """How far the archive provably reaches (pure): the newest ``walto:`` mark of a WAL
    batch or of a ship that found nothing new (``kind:walmark``)."""
    marks = [models.covered_until_of(s.tags) for s in snapshots
             if "kind:wal" in s.tags or "kind:walmark" in s.tags]
    return max((m for m in marks if m is not None), default=None)


def list_server(target: PitrTarget, *, timeout: float = 120) -> list[restic.Snapshot]:
    return restic.find_snapshots(target.repo, tags=["labkeeper", models.server_tag(target.name)],
                                 host=target.host, timeout=timeout)
