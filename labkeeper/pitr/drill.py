"""The PITR drill: restore for real to a random moment and to the newest, prove each stop.

Targets: a random time inside the window (the oldest complete base backup's end to
the newest WAL in the repository) and ``latest`` (the end of the archived WAL). Each
restore goes into a scratch directory on this host and is judged by PostgreSQL's own
recovery log: for a time target the last replayed commit is at or before the target
and the commit recovery stopped before is after it. RTO (the restore's duration) and
RPO (how old the newest archived WAL is) are judged against the server's objectives.
A missing segment fails the drill and is named. The scratch clusters are removed.

Then the cross-check with the logical backups (:mod:`labkeeper.pitr.crosscheck`): for
the newest dump of each database on the server, a restore to the WAL LSN its manifest
recorded, counted table by table against the manifest: ``ok`` when they agree,
``warn`` naming the tables where they differ, ``skipped`` with the reason when the
archive cannot reach that LSN. These restores do not count towards the RTO.
"""

from __future__ import annotations

import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from labkeeper.errors import LabkeeperError
from labkeeper.pitr import PitrError, crosscheck, restore
from labkeeper.pitr.target import (
    PitrTarget,
    StoredBase,
    complete_bases,
    coverage,
    list_server,
    wal_batches,
)

logger = logging.getLogger(__name__)


def pg_time(text: str) -> datetime | None:
    """``2026-12-05 03:23:27.019034+00`` (PostgreSQL's log) -> aware datetime."""
    text = text.strip()
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def window(bases_end: list[datetime], wal_times: list[datetime]
           ) -> tuple[datetime, datetime] | None:
    """The span a restore can reach (pure): from the oldest base backup's end to the newest
    WAL snapshot; None when there is no base backup or no WAL after it."""
    if not bases_end or not wal_times:
        return None
    lo, hi = min(bases_end), max(wal_times)
    return (lo, hi) if hi > lo else None


def pick_time(span: tuple[datetime, datetime], rng: random.Random) -> datetime:
    lo, hi = span
    return lo + timedelta(seconds=rng.uniform(0, (hi - lo).total_seconds()))


def stop_problem(outcome: restore.RecoveryOutcome, to: restore.RecoveryTarget) -> str | None:
    """Why recovery did not stop at ``to`` (pure); None when it provably did."""
    if outcome.state != "reached":
        return outcome.error or "recovery did not finish"
    if to.kind != "time" or to.time is None:
        return None
    last = pg_time(outcome.last_commit_time)
    if last is not None and last > to.time:
        return f"a commit at {last.isoformat()} after the target {to} was replayed"
    stopped_at = pg_time(outcome.stop_time)
    if outcome.stopped and stopped_at is not None and stopped_at <= to.time:
        return f"recovery stopped at {stopped_at.isoformat()}, before the target {to}"
    return None


@dataclass
class DrillRow:
    target: str
    status: str
    detail: str
    duration_s: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"target": self.target, "status": self.status, "detail": self.detail,
                "rto s": round(self.duration_s, 1)}


@dataclass
class PitrDrillResult:
    server: str
    rows: list[DrillRow] = field(default_factory=list)
    rpo_s: float | None = None
    rto_s: float = 0.0
    breaches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every restore succeeded; a cross-check that differs (``warn``) or could not
        run (``skipped``) is reported in its row but does not fail the drill."""
        return all(r.status in PASSING for r in self.rows) and not self.breaches


PASSING = ("ok", "warn", "skipped")


def run_drill(target: PitrTarget, *, seed: int | None = None,
              workdir: Path | None = None, timeout: float = 3600,
              dumps: Sequence[crosscheck.DumpRef] = ()) -> PitrDrillResult:
    """``dumps``: the dumps to cross-check (:func:`crosscheck.newest_dumps`)."""
    result = PitrDrillResult(server=target.name)
    snaps = list_server(target)
    bases = complete_bases(snaps)
    batches = wal_batches(snaps)
    now = datetime.now(tz=UTC)
    # how far the archive provably reaches: closed-segment marks, else snapshot times
    mark = coverage(snaps)
    reach = [mark] if mark is not None else [b.snapshot.time for b in batches]
    if reach:
        result.rpo_s = (now - max(reach)).total_seconds()
    span = window([b.finished_at for b in bases], reach)
    targets = [restore.RecoveryTarget("latest")]
    if span is not None:
        when = pick_time(span, random.Random(seed))  # noqa: S311 - a drill target, not crypto
        targets.insert(0, restore.RecoveryTarget("time", time=when))
    base_dir = workdir or Path(tempfile.mkdtemp(prefix="labkeeper-pitr-drill-"))
    try:
        _restores(result, target, targets, dumps, base_dir, mark, bases, timeout=timeout)
    finally:
        if workdir is None:  # ours, empty unless a failed restore was left to inspect
            with contextlib.suppress(OSError):
                base_dir.rmdir()
    return result


def _restores(result: PitrDrillResult, target: PitrTarget, targets: list[restore.RecoveryTarget],
              dumps: Sequence[crosscheck.DumpRef], base_dir: Path, mark: datetime | None,
              bases: list[StoredBase], *, timeout: float) -> None:
    for i, to in enumerate(targets):
        result.rows.append(_one(target, to, base_dir / f"restore-{i}", timeout=timeout))
    result.rto_s = max((r.duration_s for r in result.rows), default=0.0)
    obj = target.server.objectives
    if result.rto_s > obj.rto_minutes * 60:
        result.breaches.append(f"RTO {result.rto_s:.0f} s > {obj.rto_minutes} min")
    if result.rpo_s is None or result.rpo_s > obj.rpo_minutes * 60:
        rpo = "no WAL archived" if result.rpo_s is None else f"{result.rpo_s:.0f} s"
        result.breaches.append(f"RPO {rpo} > {obj.rpo_minutes} min")
    for i, ref in enumerate(dumps):
        result.rows.append(cross_check(target, ref, bases, mark, base_dir / f"dump-{i}",
                                       timeout=timeout))


def cross_check(target: PitrTarget, ref: crosscheck.DumpRef, bases: list[StoredBase],
                covered: datetime | None, workdir: Path, *, timeout: float = 3600) -> DrillRow:
    """Restore to the dump's WAL LSN (as of it: not inclusive) and compare the row
    counts of its database with the manifest's."""
    why = crosscheck.infeasible(ref.manifest, bases, covered)
    if why is not None:
        logger.info("%s: cross-check with %s skipped: %s", target.name, ref.label, why)
        return DrillRow(ref.label, "skipped", why)
    to = restore.RecoveryTarget("lsn", lsn=ref.manifest.wal_lsn, inclusive=False)
    started = time.monotonic()
    try:
        res = restore.restore_pitr(target, to, workdir, timeout=timeout)
    except LabkeeperError as exc:
        return DrillRow(ref.label, "failed", f"restore to its LSN {to}: {exc}",
                        time.monotonic() - started)
    try:
        assert res.cluster is not None
        db = ref.manifest.dbname
        tables = [(r[0], r[1]) for r in res.cluster.query(crosscheck.TABLES_SQL, db=db)]
        rows = res.cluster.query(crosscheck.counts_sql(tables), db=db) if tables else []
        status, detail = crosscheck.judge(ref, {(r[0], r[1]): int(r[2]) for r in rows})
    except LabkeeperError as exc:
        status, detail = "failed", f"counting the restore of {ref.label} failed: {exc}"
    finally:
        if res.cluster is not None:
            res.cluster.destroy()
    logger.info("%s: cross-check: %s", target.name, detail)
    return DrillRow(ref.label, status, detail, res.duration_s)


def _one(target: PitrTarget, to: restore.RecoveryTarget, workdir: Path, *,
         timeout: float) -> DrillRow:
    started = time.monotonic()
    try:
        res = restore.restore_pitr(target, to, workdir, timeout=timeout)
    except (PitrError, LabkeeperError) as exc:
        return DrillRow(str(to), "failed", str(exc), time.monotonic() - started)
    try:
        problem = stop_problem(res.outcome, to)
    finally:
        if res.cluster is not None:
            res.cluster.destroy()
    detail = problem or (f"{res.outcome.stopped or 'end of WAL ' + res.outcome.redo_done_lsn}; "
                         f"last commit {res.outcome.last_commit_time or 'n/a'}; base "
                         f"{res.base_backup_id}, {res.wal_segments} segment(s) from "
                         f"{res.wal_batches} snapshot(s)")
    logger.info("%s: drill to %s: %s", target.name, to, detail)
    return DrillRow(str(to), "failed" if problem else "ok", detail, res.duration_s)


# -- as one of dr_drill's drills -----------------------------------------------------------

def fold(res: PitrDrillResult, result: Any) -> None:
    """Fill a :class:`labkeeper.drill.DrillResult` (kind ``pitr``) from the PITR drill
    (pure): one check per restore (a cross-check that differs passes, saying how, and is
    noted; one that could not run is a note), RTO/RPO judged against its objectives."""
    from labkeeper import drill as core

    for r in res.rows:
        if r.status == "skipped":
            result.notes.append(f"cross-check {r.target} skipped: {r.detail}")
            continue
        name = r.target if r.target.startswith("dump ") else f"restore to {r.target}"
        result.check(name, r.status in PASSING, r.detail)
        if r.status == "warn":
            result.notes.append(f"{r.target}: {r.detail}")
    result.rpo_s = res.rpo_s
    result.rto_s = res.rto_s if res.rows else None
    if res.rpo_s is None:
        result.fail("no WAL is archived in the repository: RPO unknown")
    core.objective_checks(result)


def dr_drill(inv: Any, name: str, *, seed: int | None = None,
             workdir: Path | None = None, timeout: float = 3600) -> Any:
    """The PITR drill of server ``name`` as a :class:`labkeeper.drill.DrillResult`: the
    same restores as ``pitr_drill`` (a random moment, the newest, each newest dump's
    LSN), RTO and RPO against the server's ``objectives``."""
    from labkeeper import drill as core
    from labkeeper.pitr.target import resolve

    started = time.monotonic()
    result = core.DrillResult("pitr", name)
    try:
        target = resolve(inv, name, match_client=False)
        obj = target.server.objectives
        result.rpo_objective_s, result.rto_objective_s = obj.rpo_minutes * 60.0, \
            obj.rto_minutes * 60.0
        dumps = crosscheck.newest_dumps(inv, name)
        res = run_drill(target, seed=seed, workdir=workdir, timeout=timeout, dumps=dumps)
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    else:
        fold(res, result)
        result.source = ", ".join(r.target for r in res.rows)
    result.duration_s = time.monotonic() - started
    return result
