"""Base backups: ``pg_basebackup -Ft -D -`` streamed into ``restic backup --stdin``.

Tar format to stdout allows one archive only, so the backup carries no WAL
(``-X none``): the WAL it needs comes from the WAL archive (:mod:`labkeeper.pitr.wal`),
which is why a base backup refuses to run while the server has no replication slot
for ``pg_receivewal`` (its WAL would be nowhere). The stream goes through the same
relay and proof as the dumps (:func:`labkeeper.restic.stream_backup`): restic gets
end-of-stream only when pg_basebackup exited 0 *and* the stream ends with tar's
end-of-archive after the ``backup_manifest`` pg_basebackup appends last
(:func:`labkeeper.pitr.models.basebackup_tail_problem`); the manifest's
``WAL-Ranges`` give the timeline and start/end LSN. Then restic's JSON summary must
account for every byte. A companion info snapshot (same ``backup:`` tag, the range
in a ``walrange:`` tag and ``<server>.basebackup.json``) makes it count; on any
failure every snapshot of the attempt is forgotten (:func:`pg_backup.discard_attempt`).

A run killed mid-stream cannot clean up after itself, so each attempt is recorded as
pending cleanup (:mod:`labkeeper.pending`, ``<state_dir>/pitr_base/pending-<server>.json``)
*before* its stream starts and cleared once its info snapshot is stored (or its
failure cleaned up); the next base backup of the server first forgets every snapshot
of an attempt still recorded (:func:`sweep_pending`). Base backups of one server run
one at a time on a host (a ``flock`` next to the record), so a sweep never touches a
running attempt.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from labkeeper import pending as pending_mod
from labkeeper import pg_backup, postgres, process, restic
from labkeeper.errors import LabkeeperError
from labkeeper.pitr import PitrError, models
from labkeeper.pitr.target import PitrTarget, lsn_range_tag

logger = logging.getLogger(__name__)

PG_BASEBACKUP_CODES = process.ExitCodeTable("pg_basebackup", {
    0: process.ExitCode("success", "ok"),
    1: process.ExitCode("pg_basebackup failed", "permanent"),
})
MAX_LOCK_CONFLICTS = 3


def pg_basebackup_argv(conn: postgres.Conn, *, label: str,
                       max_rate_kb: int | None = None) -> tuple[str, ...]:
    """One tar on stdout, no WAL in it, manifest appended, fast checkpoint (pure)."""
    argv: tuple[str, ...] = (
        "pg_basebackup", "-h", conn.host, "-p", str(conn.port), "-U", conn.user,
        "--no-password", "-D", "-", "-Ft", "-X", "none", "--checkpoint=fast",
        "--label", label, "--verbose")
    if max_rate_kb:
        argv += (f"--max-rate={max_rate_kb}k",)
    return conn.argv(argv)


def major_tag(conn: postgres.Conn) -> list[str]:
    major = conn.client.server_major
    return [f"pgmajor:{major}"] if major else []


def slot_sql(slot: str) -> str:
    """The slot's row: active, restart_lsn (the slot name is validated: [a-z0-9_])."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        raise ValueError(f"not a replication slot name: {slot!r}")
    query = "SELECT active, restart_lsn, wal_status FROM pg_replication_slots WHERE slot_name = "
    return f"{query}'{slot}';"


@dataclass
class BaseBackupResult:
    server: str
    backup_id: str
    snapshot_id: str
    info_snapshot_id: str
    timeline: int
    start_lsn: str
    end_lsn: str
    bytes: int
    duration_s: float
    notes: list[str]

    def row(self) -> dict[str, Any]:
        return {"server": self.server, "status": "ok", "snapshot": self.snapshot_id[:8],
                "timeline": self.timeline, "start lsn": self.start_lsn,
                "end lsn": self.end_lsn, "bytes": self.bytes,
                "duration s": round(self.duration_s, 2), "backup id": self.backup_id,
                "notes": "; ".join(self.notes)}


def check_slot(target: PitrTarget) -> None:
    """Refuse a base backup whose WAL would not be archived: the slot must exist."""
    rows = postgres.query(target.conn, slot_sql(target.server.slot_name), timeout=60)
    if not rows:
        raise PitrError(
            f"pitr {target.name}: replication slot {target.server.slot_name} does not exist, "
            "so the WAL this base backup needs would be archived nowhere; start "
            f"`labkeeper wal receive {target.name}` first")


def run_base_backup(target: PitrTarget, *, stall_timeout: float = 300.0,
                    require_slot: bool = True) -> BaseBackupResult:
    """Take one base backup into the repository (see the module docstring)."""
    if require_slot:
        check_slot(target)
    store = pending_store(target)
    with one_at_a_time(target, store):
        return _run(target, store, stall_timeout=stall_timeout)


def _run(target: PitrTarget, store: pending_mod.PendingStore | None, *,
         stall_timeout: float) -> BaseBackupResult:
    started = time.monotonic()
    notes = sweep_pending(target, store) if store is not None else []
    for _ in range(MAX_LOCK_CONFLICTS):
        backup_id = pg_backup.new_backup_id()
        mark(target, store, backup_id)
        try:
            result = _attempt(target, backup_id, stall_timeout=stall_timeout)
        except PitrError:
            settle(target, store, backup_id)
            raise
        except _Locked as exc:
            unmark(store, backup_id)  # restic read nothing: nothing was stored
            notes += restic.wait_for_locks(target.repo, exclusive=False,
                                           wait=target.lock_wait_s,
                                           stale_after=target.stale_lock_s)
            logger.info("%s: %s; trying again", target.name, exc)
            continue
        unmark(store, backup_id)
        result.duration_s = time.monotonic() - started
        result.notes = notes + result.notes
        return result
    raise PitrError(f"base backup of {target.name}: the repository was locked at each of "
                    f"{MAX_LOCK_CONFLICTS} attempts", transient=True)


class _Locked(Exception):
    pass


# -- pending-cleanup records (labkeeper.pending) -----------------------------------------

PENDING_DIR = "pitr_base"
CLEANUP_TIMEOUT = 90.0


def pending_store(target: PitrTarget) -> pending_mod.PendingStore | None:
    """``<state_dir>/pitr_base/pending-<server>.json`` (None: the target has no state dir)."""
    if target.state_dir is None:
        return None
    owner = pending_mod.Owner(PENDING_DIR, (("server", target.name, "pitr server"),),
                              f"pg:{target.name} kind:basebackup")
    return pending_mod.PendingStore(target.state_dir, owner)


@contextlib.contextmanager
def one_at_a_time(target: PitrTarget, store: pending_mod.PendingStore | None
                  ) -> Iterator[None]:
    """Hold ``running-<server>.lock`` next to the record for the whole run; a second
    base backup of the server on this host is refused (it would sweep a running one)."""
    if store is None:
        yield
        return
    store.path.parent.mkdir(parents=True, exist_ok=True)
    path = store.path.parent / f"running-{target.name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PitrError(f"base backup of {target.name}: another one is running on this "
                            f"host ({path} is locked)", transient=True) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def mark(target: PitrTarget, store: pending_mod.PendingStore | None, backup_id: str) -> None:
    """Record the attempt before its stream starts (a refusal stops it before then)."""
    if store is None:
        return
    try:
        store.add(pending_mod.new_pending(
            backup_id, snapshot_host=target.host,
            reason="base backup started; not finished (the run was stopped mid-way)"))
    except (OSError, LabkeeperError) as exc:
        raise PitrError(f"base backup of {target.name}: cannot record the attempt in "
                        f"{store.path} ({exc}); not starting it") from None


def unmark(store: pending_mod.PendingStore | None, backup_id: str) -> None:
    if store is None:
        return
    try:
        store.remove([backup_id])
    except (OSError, LabkeeperError) as exc:  # swept (harmlessly) by the next run
        logger.warning("could not clear attempt %s from %s: %s", backup_id, store.path, exc)


def settle(target: PitrTarget, store: pending_mod.PendingStore | None, backup_id: str) -> None:
    """After a failed attempt: clear its record only when no snapshot of it is left."""
    if store is None:
        return
    done, note = pending_mod.forget_attempt(target.repo, backup_id, host=target.host,
                                            timeout=CLEANUP_TIMEOUT)
    if done:
        unmark(store, backup_id)
    else:
        logger.warning("%s: %s; it stays pending in %s for the next base backup",
                       target.name, note, store.path)


def sweep_pending(target: PitrTarget, store: pending_mod.PendingStore) -> list[str]:
    """Forget every snapshot of each attempt still recorded (a run stopped mid-way);
    an attempt leaves the record only once that succeeded."""

    def clean(attempt: pending_mod.PendingAttempt) -> tuple[bool, str]:
        done, note = pending_mod.forget_attempt(target.repo, attempt.backup_id,
                                                host=attempt.snapshot_host,
                                                timeout=CLEANUP_TIMEOUT)
        return done, (f"{target.name}: earlier base backup attempt {attempt.backup_id} "
                      f"(pending since {attempt.since}): {note}")

    notes, left = pending_mod.sweep(store, clean)
    if left:
        notes.append(f"{target.name}: {len(left)} earlier attempt(s) still await cleanup ("
                     + ", ".join(a.backup_id for a in left) + "); never counted (no info "
                     "snapshot), swept again next time")
    return notes


def _attempt(target: PitrTarget, backup_id: str, *, stall_timeout: float) -> BaseBackupResult:
    tag = pg_backup.backup_tag(backup_id)
    seen: list[models.WalRange] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        problem = models.basebackup_tail_problem(tail, nbytes)
        if problem is None:
            seen.extend(models.parse_wal_ranges(tail.rstrip(b"\0").decode("utf-8", "replace")))
        return problem

    started_at = datetime.now(tz=UTC)
    logger.info("%s: base backup %s into the repository", target.name, backup_id)
    producer = process.Stage(pg_basebackup_argv(target.conn, label=f"labkeeper {backup_id}",
                                                max_rate_kb=target.server.max_rate_kb),
                             codes=postgres.codes_for(target.conn, PG_BASEBACKUP_CODES),
                             env=target.conn.env())
    try:
        stream = restic.stream_backup(
            target.repo, producer, filename=models.base_filename(target.name),
            host=target.host, tags=[*models.base_tags(target.name), tag], gate=gate,
            timeout=target.server.timeout_minutes * 60, compression=target.compression,
            stall_timeout=stall_timeout)
    except restic.StreamFailed as exc:
        if exc.locked:
            raise _Locked(str(exc)) from None
        unlock = not exc.eof_given or exc.cause != "producer"
        cleanup = pg_backup.discard_attempt(target.repo, host=target.host,
                                            backup_id=backup_id, unlock=unlock)
        raise PitrError(f"base backup of {target.name} failed: {exc} [{'; '.join(cleanup)}]",
                        transient=exc.transient) from None
    rng = seen[-1]
    info = models.BaseBackupInfo(
        backup_id=backup_id, server=target.name, lab=target.host, timeline=rng.timeline,
        start_lsn=rng.start_lsn, end_lsn=rng.end_lsn, started_at=started_at,
        finished_at=datetime.now(tz=UTC), bytes=stream.bytes,
        snapshot_id=stream.summary.snapshot_id)
    try:
        isum = restic.backup_bytes(
            target.repo, info.to_json(), filename=models.info_filename(target.name),
            host=target.host, compression=target.compression, timeout=300,
            tags=[*models.base_info_tags(target.name), tag,
                  lsn_range_tag(rng.timeline, rng.start_lsn, rng.end_lsn),
                  *major_tag(target.conn)])
    except LabkeeperError as exc:
        cleanup = pg_backup.discard_attempt(target.repo, host=target.host,
                                            backup_id=backup_id, unlock=True)
        raise PitrError(f"base backup of {target.name}: storing its info failed: {exc} "
                        f"[{'; '.join(cleanup)}]", transient=exc.transient) from None
    logger.info("%s: base backup %s (%s bytes), timeline %s, WAL %s .. %s", target.name,
                restic.short_id(stream.summary.snapshot_id), stream.bytes, rng.timeline,
                rng.start_lsn, rng.end_lsn)
    return BaseBackupResult(
        server=target.name, backup_id=backup_id, snapshot_id=stream.summary.snapshot_id,
        info_snapshot_id=isum.snapshot_id, timeline=rng.timeline, start_lsn=rng.start_lsn,
        end_lsn=rng.end_lsn, bytes=stream.bytes, duration_s=0.0, notes=[])
