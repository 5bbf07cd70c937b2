"""PITR retention: keep the newest N complete base backups, and the WAL they need.

A WAL batch is forgotten only when *every* segment in it is older than the start
segment of the oldest kept base backup (a batch straddling that point is kept whole).
Leftovers of failed base backups (a tar without its info snapshot) older than a grace
period are forgotten too. With no complete base backup nothing is forgotten at all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from labkeeper import pg_backup, restic
from labkeeper.pitr import models
from labkeeper.pitr.target import PitrTarget, complete_bases, list_server, wal_batches

logger = logging.getLogger(__name__)
LEFTOVER_GRACE = timedelta(hours=6)


@dataclass
class RetentionPlan:
    keep_bases: list[str] = field(default_factory=list)
    forget: list[restic.Snapshot] = field(default_factory=list)
    oldest_needed_segment: str = ""
    reasons: list[str] = field(default_factory=list)


def plan(snapshots: list[restic.Snapshot], keep: int, *, now: datetime | None = None
         ) -> RetentionPlan:
    """What to forget (pure)."""
    now = now or datetime.now(tz=UTC)
    out = RetentionPlan()
    bases = complete_bases(snapshots)
    if not bases:
        out.reasons.append("no complete base backup: nothing is forgotten")
        return out
    kept, dropped = bases[-keep:], bases[:-keep] if len(bases) > keep else []
    out.keep_bases = [b.backup_id for b in kept]
    oldest = kept[0]
    out.oldest_needed_segment = oldest.start_segment
    need = models.parse_segment(oldest.start_segment)[1]
    for b in dropped:
        out.forget += [b.base, b.info]
        out.reasons.append(f"base backup {b.backup_id}: beyond the newest {keep}")
    for w in wal_batches(snapshots):
        if models.parse_segment(w.last)[1] < need:
            out.forget.append(w.snapshot)
            out.reasons.append(f"WAL {w.first}..{w.last}: older than {oldest.start_segment}, "
                               f"the start of the oldest kept base backup {oldest.backup_id}")
    marks = sorted((s for s in snapshots if "kind:walmark" in s.tags), key=lambda s: s.time)
    for s in marks[:-1]:
        out.forget.append(s)
        out.reasons.append(f"archive mark {s.time.isoformat()}: a newer one exists")
    complete = {b.backup_id for b in bases}
    for s in snapshots:
        bid = pg_backup.backup_id_of(s)
        if ("kind:basebackup" in s.tags and bid not in complete
                and now - s.time > LEFTOVER_GRACE):
            out.forget.append(s)
            out.reasons.append(f"base backup attempt {bid}: no info snapshot (failed attempt)")
    return out


def apply(target: PitrTarget, *, dry_run: bool = False) -> RetentionPlan:
    p = plan(list_server(target), target.server.retention.keep_base_backups)
    for r in p.reasons:
        if r.startswith("no complete"):
            logger.info("%s: %s", target.name, r)
        else:
            logger.info("%s: %s: %s", target.name, "would forget" if dry_run else "forget", r)
    if p.forget and not dry_run:
        restic.forget_ids(target.repo, [s.id for s in p.forget])
    return p
