"""How far behind is archiving? Receive lag, ship lag, slot retention, RPO — and warnings.

An abandoned slot fills the database server's disk: the server keeps every WAL
segment the slot has not confirmed. :func:`judge` (pure) turns the facts into
warnings before that hurts: slot missing or inactive, WAL retained beyond
``warn.slot_retained_mb``, ``wal_status`` ``unreserved``/``lost`` (past
``max_slot_wal_keep_size``), completed segments waiting in the spool longer than
``warn.ship_lag_minutes``, the newest WAL in the repository older than the RPO.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from labkeeper import postgres
from labkeeper.errors import LabkeeperError
from labkeeper.inventory.pitr import PitrServer
from labkeeper.pitr import wal
from labkeeper.pitr.target import PitrTarget, complete_bases, coverage, list_server, wal_batches

MB = 1024 * 1024


def slot_facts_sql(slot: str) -> str:
    """Current WAL position and the slot's state (slot names are [a-z0-9_]: validated)."""
    if not slot.replace("_", "").isalnum() or not slot.islower():
        raise ValueError(f"not a replication slot name: {slot!r}")
    query = ("SELECT pg_current_wal_lsn(), coalesce(s.active::text, ''), "
             "coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint::text, ''), "
             "coalesce(s.wal_status, ''), coalesce(s.safe_wal_size::text, '') "
             "FROM (SELECT 1) one LEFT JOIN pg_replication_slots s ON s.slot_name = ")
    return f"{query}'{slot}';"


@dataclass
class LagFacts:
    server: str
    current_lsn: str = ""
    slot_exists: bool = False
    slot_active: bool = False
    retained_bytes: int | None = None
    wal_status: str = ""
    safe_wal_size: int | None = None
    spool_ready: int = 0
    oldest_ready_age_s: float | None = None
    newest_wal_in_repo: datetime | None = None
    newest_base_in_repo: datetime | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_slot_row(facts: LagFacts, row: list[str]) -> None:
    facts.current_lsn = row[0]
    facts.slot_exists = row[1] != ""
    facts.slot_active = row[1] == "true"
    facts.retained_bytes = int(row[2]) if row[2] else None
    facts.wal_status = row[3]
    facts.safe_wal_size = int(row[4]) if row[4] else None


def judge(facts: LagFacts, cfg: PitrServer, *, now: datetime) -> list[str]:
    """Warnings for one server (pure); empty when all is well."""
    out: list[str] = [f"{facts.server}: {e}" for e in facts.errors]
    w, name = cfg.warn, facts.server
    if facts.current_lsn and not facts.slot_exists:
        out.append(f"{name}: replication slot {cfg.slot_name} does not exist: WAL is not "
                   "being archived (start `labkeeper wal receive`)")
    elif facts.slot_exists and not facts.slot_active:
        out.append(f"{name}: slot {cfg.slot_name} is inactive: no receiver is running, and the "
                   "server keeps all WAL from its position on (its disk fills)")
    if facts.retained_bytes is not None and facts.retained_bytes > w.slot_retained_mb * MB:
        out.append(f"{name}: slot {cfg.slot_name} holds {facts.retained_bytes // MB} MiB of "
                   f"WAL on the server (warn at {w.slot_retained_mb} MiB)")
    if facts.wal_status in ("unreserved", "lost"):
        out.append(f"{name}: slot {cfg.slot_name} wal_status is {facts.wal_status}: WAL beyond "
                   "max_slot_wal_keep_size is (being) removed; take a new base backup")
    if (facts.oldest_ready_age_s is not None
            and facts.oldest_ready_age_s > w.ship_lag_minutes * 60):
        out.append(f"{name}: {facts.spool_ready} segment(s) waiting in the spool, the oldest for "
                   f"{facts.oldest_ready_age_s / 60:.0f} min: shipping is not keeping up")
    if facts.newest_wal_in_repo is None:
        out.append(f"{name}: no WAL in the repository yet")
    else:
        age = (now - facts.newest_wal_in_repo).total_seconds()
        if age > cfg.objectives.rpo_minutes * 60:
            out.append(f"{name}: the newest WAL in the repository is {age / 60:.0f} min old "
                       f"(RPO {cfg.objectives.rpo_minutes} min)")
    if facts.newest_base_in_repo is None:
        out.append(f"{name}: no complete base backup in the repository")
    return out


def gather(target: PitrTarget, *, repository: bool = True) -> LagFacts:
    facts = LagFacts(server=target.name)
    try:
        rows = postgres.query(target.conn, slot_facts_sql(target.server.slot_name), timeout=30)
        if rows:
            parse_slot_row(facts, rows[0])
    except LabkeeperError as exc:
        facts.errors.append(f"cannot ask the server: {exc}")
    ready = wal.ready_files(target.spool)
    facts.spool_ready = len(ready)
    if ready:
        try:
            mtime = os.stat(target.spool / ready[0]).st_mtime
            facts.oldest_ready_age_s = max(0.0, time.time() - mtime)
        except FileNotFoundError:
            pass
    if repository:
        try:
            snaps = list_server(target)
            batches = wal_batches(snaps)
            bases = complete_bases(snaps)
            facts.newest_wal_in_repo = coverage(snaps) or max(
                (b.snapshot.time for b in batches), default=None)
            facts.newest_base_in_repo = bases[-1].finished_at if bases else None
        except LabkeeperError as exc:
            facts.errors.append(f"cannot list the repository: {exc}")
    return facts


def report(target: PitrTarget, *, now: datetime | None = None) -> tuple[LagFacts, list[str]]:
    facts = gather(target)
    return facts, judge(facts, target.server, now=now or datetime.now(tz=UTC))


def doctor_status(facts: LagFacts, warnings: list[str]) -> tuple[str, str]:
    """``(status, detail)`` for ``labkeeper doctor`` (pure): fail when WAL is not being
    archived at all (no slot, slot lost, server unreachable), warn on any warning."""
    lost = facts.wal_status == "lost"
    if facts.errors or not facts.slot_exists or lost:
        return "fail", "; ".join(warnings) or "WAL is not being archived"
    if warnings:
        return "warn", "; ".join(warnings)
    retained = facts.retained_bytes or 0
    return "ok", (f"slot active, {retained // MB} MiB retained, {facts.spool_ready} segment(s) "
                  f"waiting, newest WAL in repository {facts.newest_wal_in_repo}")


def doctor_check(inv: Any, name: str) -> Any:
    """The doctor's ``pitr`` check of one server (a :class:`labkeeper.doctor.CheckResult`)."""
    from labkeeper.doctor import CheckResult
    from labkeeper.pitr.target import resolve

    started = time.monotonic()
    try:
        facts, warnings = report(resolve(inv, name))
    except LabkeeperError as exc:
        return CheckResult("pitr", name, "fail", int((time.monotonic() - started) * 1000),
                           str(exc))
    status, detail = doctor_status(facts, warnings)
    return CheckResult("pitr", name, status,  # type: ignore[arg-type]
                       int((time.monotonic() - started) * 1000), detail)
