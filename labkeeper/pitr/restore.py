"""Restore a PITR server to a point in time, into a scratch data directory on this host.

1. **Choose.** The newest complete base backup that finished before the target (for an
   LSN: whose end LSN is at or before it).
2. **Check the chain.** The WAL snapshots must hold every segment from the base
   backup's start segment on, without a gap (the first missing segment is named).
3. **Fetch in bulk.** One ``restic dump | tar -x`` for the base backup, one per WAL
   *batch* (a ship run's snapshot holds many segments), never one per segment. The
   base is checked with ``pg_verifybackup`` against its own manifest.
4. **Recover.** ``recovery.signal``, ``restore_command`` copying from the fetched WAL,
   ``recovery_target_time``/``_lsn`` and ``recovery_target_action``; the cluster starts
   on a private socket (:mod:`labkeeper.pitr.scratch`), and its log is watched until
   recovery stopped at the target (or failed: the reason, e.g. a missing file, is
   reported). What it reached is read back from the log (:func:`parse_recovery_log`).

Never onto a live server: the restore only ever writes into a new directory.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from labkeeper import process, restic
from labkeeper.pitr import PitrError, models, scratch
from labkeeper.pitr.target import (
    PitrTarget,
    StoredBase,
    StoredWal,
    complete_bases,
    coverage,
    list_server,
    wal_batches,
)

logger = logging.getLogger(__name__)
TargetKind = Literal["time", "lsn", "latest"]


# -- targets (pure) ----------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryTarget:
    kind: TargetKind
    time: datetime | None = None
    lsn: str | None = None
    inclusive: bool = True
    """False: stop just before the first record at or after the LSN (the state *as of*
    the LSN, e.g. a dump manifest's ``wal_lsn``), not after it."""

    def __str__(self) -> str:
        if self.kind == "time" and self.time is not None:
            return self.time.isoformat()
        return self.lsn or "latest"


def parse_target(text: str) -> RecoveryTarget:
    """``latest``, an LSN (``0/3000060``) or an ISO time (naive = UTC)."""
    text = text.strip()
    if text.lower() == "latest":
        return RecoveryTarget("latest")
    try:
        models.parse_lsn(text)
        return RecoveryTarget("lsn", lsn=text.upper())
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise PitrError(f"--to {text!r}: expected an ISO time (2026-12-05T14:04:00Z), an "
                        "LSN (0/3000060) or 'latest'") from None
    return RecoveryTarget("time", time=when if when.tzinfo else when.replace(tzinfo=UTC))


def choose_base(bases: list[StoredBase], target: RecoveryTarget) -> StoredBase:
    """The newest base backup usable for ``target`` (pure)."""
    if target.kind == "time":
        assert target.time is not None
        usable = [b for b in bases if b.finished_at <= target.time]
    elif target.kind == "lsn":
        want = models.parse_lsn(target.lsn or "")
        usable = [b for b in bases if models.parse_lsn(b.end_lsn) <= want]
    else:
        usable = list(bases)
    if not usable:
        oldest = (f"the oldest finished at {bases[0].finished_at.isoformat()} (end LSN "
                  f"{bases[0].end_lsn})" if bases else "there is none")
        raise PitrError(f"no base backup finished before {target}: {oldest}")
    return max(usable, key=lambda b: (b.finished_at, models.parse_lsn(b.end_lsn)))


def expand(batch: StoredWal) -> list[str]:
    """The segment names a batch's range covers (one timeline: first..last)."""
    t1, s1 = models.parse_segment(batch.first)
    t2, s2 = models.parse_segment(batch.last)
    if t1 != t2:
        return [batch.first, batch.last]
    return [models.segment_name(t1, s) for s in range(s1, s2 + 1)]


@dataclass(frozen=True)
class WalPlan:
    batches: list[StoredWal]
    names: list[str]
    """The contiguous segments from the base backup's start (up to any gap)."""
    gap: str | None = None
    """The first segment missing after them, when WAL exists beyond it."""


def plan_wal(base: StoredBase, batches: list[StoredWal], target: RecoveryTarget) -> WalPlan:
    """The batches the restore needs and the segments they hold (pure). Raises, naming
    the segment, when the chain from the base backup's start does not reach the base
    backup's end (it could never become consistent) or, for ``latest``, has a gap
    anywhere (the end of WAL would silently be the gap). A gap after a time or LSN
    target's base is returned: recovery may still reach the target before it."""
    start = models.parse_segment(base.start_segment)[1]
    end_seg = models.parse_segment(base.end_segment_name)[1]
    stop = (models.segment_number(models.parse_lsn(target.lsn or ""))
            if target.kind == "lsn" else None)
    chosen = [b for b in batches if models.parse_segment(b.last)[1] >= start
              and (stop is None or models.parse_segment(b.first)[1] <= stop)]
    names = sorted({n for b in chosen for n in expand(b)
                    if models.parse_segment(n)[1] >= start})
    gap = models.first_gap(names, base.start_segment)
    if gap is not None:
        names = [n for n in names if models.parse_segment(n)[1] < models.parse_segment(gap)[1]]
        chosen = [b for b in chosen
                  if models.parse_segment(b.first)[1] < models.parse_segment(gap)[1]]
    if not names or models.parse_segment(names[-1])[1] < end_seg:
        gap = gap or models.segment_name(base.timeline, end_seg)
        raise PitrError(f"WAL segment {gap} is missing from the repository: base backup "
                        f"{base.backup_id} (WAL {base.start_lsn}..{base.end_lsn}) cannot "
                        "become consistent without it")
    if gap is not None and target.kind == "latest":
        raise PitrError(f"WAL segment {gap} is missing from the repository: WAL after "
                        f"{names[-1]} exists but cannot be replayed past the gap")
    return WalPlan(chosen, names, gap)


# -- the recovery log (pure) -------------------------------------------------------------

@dataclass
class RecoveryOutcome:
    state: Literal["running", "reached", "failed"] = "running"
    stopped: str = ""
    """PostgreSQL's own words: ``recovery stopping before commit of transaction ...``."""
    stop_time: str = ""
    last_commit_time: str = ""
    redo_done_lsn: str = ""
    error: str = ""
    missing_file: str = ""


_STOP_RE = re.compile(r"LOG:\s+(recovery stopping .*?)(?:, time (\S+ \S+(?: \S+)?))?$")
_LAST_RE = re.compile(r"last completed transaction was at log time (.+)$")
_REDO_RE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+)")
_FATAL_RE = re.compile(r"(?:FATAL|PANIC):\s+(.*)$")
_MISSING_RE = re.compile(r'(?:could not open file|could not find) .*?"?(?:pg_wal/)?'
                         r'([0-9A-F]{24})"?')


def parse_recovery_log(text: str, *, action: str = "promote") -> RecoveryOutcome:
    out = RecoveryOutcome()
    ready = False
    for line in text.splitlines():
        if (m := _STOP_RE.search(line)) is not None:
            out.stopped = m.group(1)
            out.stop_time = m.group(2) or ""
        elif (m := _LAST_RE.search(line)) is not None:
            out.last_commit_time = m.group(1).strip()
        elif (m := _REDO_RE.search(line)) is not None:
            out.redo_done_lsn = m.group(1)
        elif (m := _FATAL_RE.search(line)) is not None and not out.error:
            out.error = m.group(1)
            if (mm := _MISSING_RE.search(line)) is not None:
                out.missing_file = mm.group(1)
        elif "database system is ready to accept connections" in line or (
                action == "pause" and "pausing at the end of recovery" in line):
            ready = True
        elif "startup process" in line and "exited with exit code" in line and not out.error:
            out.error = line.split("LOG:", 1)[-1].strip()
    if out.error:
        out.state = "failed"
    elif ready and (out.redo_done_lsn or out.stopped):
        out.state = "reached"
    return out


def recovery_settings(*, port: int, sockdir: Path, waldir: Path, target: RecoveryTarget,
                      action: str = "promote") -> str:
    """Lines appended to the restored ``postgresql.auto.conf`` (later lines win)."""
    lines = {
        "port": str(port), "listen_addresses": "''",
        "unix_socket_directories": f"'{sockdir}'",
        "restore_command": f"'cp \"{waldir}/%f\" \"%p\"'",
        "archive_mode": "off", "ssl": "off", "hot_standby": "on",
        "logging_collector": "off", "log_destination": "'stderr'",
        "recovery_target_action": f"'{action}'", "recovery_target_timeline": "'latest'",
    }
    if target.kind == "time" and target.time is not None:
        lines["recovery_target_time"] = f"'{target.time.astimezone(UTC).isoformat()}'"
    elif target.kind == "lsn":
        lines["recovery_target_lsn"] = f"'{target.lsn}'"
        if not target.inclusive:
            lines["recovery_target_inclusive"] = "off"
    return "\n# labkeeper point-in-time restore\n" + "".join(
        f"{k} = {v}\n" for k, v in lines.items())


# -- the restore -------------------------------------------------------------------------

@dataclass
class RestoreResult:
    server: str
    target: str
    base_backup_id: str
    base_finished_at: str
    wal_batches: int
    wal_segments: int
    outcome: RecoveryOutcome
    workdir: str
    port: int
    sockdir: str
    fetch_s: float = 0.0
    recover_s: float = 0.0
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    cluster: scratch.ScratchCluster | None = None

    def row(self) -> dict[str, Any]:
        o = self.outcome
        return {"server": self.server, "target": self.target, "status": o.state,
                "base backup": self.base_backup_id, "wal batches": self.wal_batches,
                "segments": self.wal_segments, "stopped": o.stopped or o.redo_done_lsn,
                "last commit": o.last_commit_time, "fetch s": round(self.fetch_s, 2),
                "recover s": round(self.recover_s, 2), "duration s": round(self.duration_s, 2),
                "connect": f"psql -h {self.sockdir} -p {self.port}"}


def extract_argv(dest: Path) -> tuple[str, ...]:
    """tar extracting a stream into ``dest``. ``--ignore-zeros``: read the stream to its
    end. Without it tar stops at the end-of-archive blocks and may close its input while
    the producer still writes the archive's padding; the producer then dies of EPIPE and
    the tar still finishing its files is killed with it (seen under load)."""
    return ("tar", "--extract", "--ignore-zeros", "--file=-", f"--directory={dest}",
            "--no-same-owner")


def _dump_into(repo: restic.Repo, snapshot: restic.Snapshot, filename: str, dest: Path, *,
               timeout: float) -> None:
    process.pipeline([
        process.Stage(restic.dump_argv(repo, snapshot.id, f"/{filename}"), env=repo.env(),
                      codes=restic.EXIT_CODES),
        extract_argv(dest),
    ], timeout=timeout)


def fetch(target: PitrTarget, base: StoredBase, batches: list[StoredWal], names: list[str],
          cluster: scratch.ScratchCluster, waldir: Path, *, timeout: float) -> None:
    cluster.datadir.mkdir(mode=0o700)
    _dump_into(target.repo, base.base, models.base_filename(target.name), cluster.datadir,
               timeout=timeout)
    logger.info("%s: base backup %s restored into %s", target.name, base.backup_id,
                cluster.datadir)
    process.run((str(cluster.bindir / "pg_verifybackup"), "--no-parse-wal", "--quiet",
                 str(cluster.datadir)), timeout=timeout)
    waldir.mkdir(mode=0o700)
    for b in batches:
        _dump_into(target.repo, b.snapshot, models.wal_filename(b.first, b.last), waldir,
                   timeout=timeout)
    missing = [n for n in names if not (waldir / n).exists()]
    if missing:
        raise PitrError(f"WAL segment {missing[0]} is missing from the repository (its batch "
                        f"snapshot does not hold it; {len(missing)} missing in all)")
    logger.info("%s: %d WAL segment(s) fetched from %d snapshot(s)", target.name, len(names),
                len(batches))


def prepare_datadir(datadir: Path, settings: str) -> None:
    (datadir / "pg_wal" / "archive_status").mkdir(parents=True, exist_ok=True)
    if not (datadir / "postgresql.conf").exists():  # Debian keeps it in /etc
        (datadir / "postgresql.conf").write_text("# written by labkeeper restore pitr\n")
    (datadir / "pg_hba.conf").write_text("local all all trust\n")
    with (datadir / "postgresql.auto.conf").open("a") as f:
        f.write(settings)
    (datadir / "recovery.signal").write_text("")
    for stale in ("postmaster.pid", "postmaster.opts", "standby.signal"):
        (datadir / stale).unlink(missing_ok=True)


def wait_for_recovery(cluster: scratch.ScratchCluster, *, timeout: float,
                      action: str, offset: int = 0) -> RecoveryOutcome:
    deadline = time.monotonic() + timeout
    outcome = RecoveryOutcome()
    while time.monotonic() < deadline:
        outcome = parse_recovery_log(cluster.log_text()[offset:], action=action)
        if outcome.state != "running":
            return outcome
        time.sleep(0.2)
    outcome.state = "failed"
    outcome.error = f"recovery did not reach its target within {timeout:g} s"
    return outcome


NOT_REACHED = "recovery ended before configured recovery target was reached"


def archive_covers(reach: datetime | None, to: RecoveryTarget) -> datetime | None:
    """``reach`` when the archived WAL provably holds every commit up to the time target
    (pure): a ship closed the server's segment at or after it (``walto:`` marks,
    :func:`labkeeper.pitr.target.coverage`)."""
    if to.kind != "time" or to.time is None:
        return None
    return reach if reach is not None and reach >= to.time else None


def _to_end_of_wal(cluster: scratch.ScratchCluster, *, timeout: float,
                   action: str) -> RecoveryOutcome:
    """Recovery stopped at the end of the archive short of a time target that the archive
    covers: no commit lies between the last one and the target, so the end of the WAL
    *is* the target's state. Restart recovery without the target."""
    cluster.stop()
    with (cluster.datadir / "postgresql.auto.conf").open("a") as f:
        f.write("recovery_target_time = ''\n")
    offset = len(cluster.log_text())
    cluster.start()
    return wait_for_recovery(cluster, timeout=timeout, action=action, offset=offset)


def restore_pitr(target: PitrTarget, to: RecoveryTarget, workdir: Path, *,
                 action: str = "promote", timeout: float = 3600,
                 keep_running: bool = True) -> RestoreResult:
    """Restore ``target``'s server as of ``to`` into ``workdir`` (new or empty); see the
    module docstring. The cluster keeps running (``keep_running``) for inspection;
    :attr:`RestoreResult.cluster` stops it. Raises :class:`PitrError` when no base
    backup or WAL suffices, or recovery failed (the log's reason in the message)."""
    started = time.monotonic()
    snaps = list_server(target)
    base = choose_base(complete_bases(snaps), to)
    plan = plan_wal(base, wal_batches(snaps), to)
    batches, names = plan.batches, plan.names
    logger.info("%s: restoring to %s from base backup %s (finished %s) + %d WAL segment(s)",
                target.name, to, base.backup_id, base.finished_at.isoformat(), len(names))
    if plan.gap:
        logger.warning("%s: WARNING WAL segment %s is missing from the repository; recovery "
                       "can use the WAL up to %s only", target.name, plan.gap, names[-1])
    scratch.new_workdir(workdir)
    cluster = scratch.ScratchCluster(workdir, scratch.bindir_for(base.major or _installed_major()),
                                     scratch.free_port())
    waldir = workdir / "wal"
    fetch(target, base, batches, names, cluster, waldir, timeout=timeout)
    fetched = time.monotonic()
    cluster.sockdir.mkdir(mode=0o700)
    prepare_datadir(cluster.datadir, recovery_settings(
        port=cluster.port, sockdir=cluster.sockdir, waldir=waldir, target=to, action=action))
    cluster.start()
    outcome = wait_for_recovery(cluster, timeout=timeout, action=action)
    notes: list[str] = []
    covered = None if plan.gap else archive_covers(coverage(snaps), to)
    if outcome.error.startswith(NOT_REACHED) and covered is not None:
        notes.append(f"no commit after {outcome.last_commit_time or 'the base backup'} up to "
                     f"the target; the archive holds every commit until "
                     f"{covered.isoformat()}: recovered to the end of the archived WAL")
        logger.info("%s: %s", target.name, notes[-1])
        outcome = _to_end_of_wal(cluster, timeout=timeout, action=action)
    result = RestoreResult(
        server=target.name, target=str(to), base_backup_id=base.backup_id,
        base_finished_at=base.finished_at.isoformat(), wal_batches=len(batches),
        wal_segments=len(names), outcome=outcome, workdir=str(workdir), port=cluster.port,
        sockdir=str(cluster.sockdir), fetch_s=fetched - started,
        recover_s=time.monotonic() - fetched, duration_s=time.monotonic() - started,
        notes=notes, cluster=cluster)
    if outcome.state != "reached":
        cluster.stop()
        missing = outcome.missing_file or plan.gap
        what = f" (WAL segment {missing} is missing from the repository)" if missing else ""
        raise PitrError(f"recovery of {target.name} to {to} failed{what}: {outcome.error}; "
                        f"log: {cluster.logfile}")
    logger.info("%s: recovery reached its target: %s%s; last commit %s", target.name,
                outcome.stopped or "end of WAL at ", "" if outcome.stopped else
                outcome.redo_done_lsn, outcome.last_commit_time or "unknown")
    if not keep_running:
        cluster.stop()
    return result


def _installed_major() -> int:
    found = sorted(int(p.parent.name) for p in scratch.PG_ROOT.glob("*/bin/postgres")
                   if p.parent.parent.name.isdigit())
    if not found:
        raise PitrError("no PostgreSQL server binaries under /usr/lib/postgresql")
    return found[-1]
