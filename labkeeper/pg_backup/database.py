"""One database's backup (:func:`backup_database`): two restic runs, overlapped.

1. The manifest's ``restic backup --stdin`` starts first and waits for its data
   (:class:`labkeeper.restic.PendingBackup`): its start-up overlaps the dump.
2. One ``psql`` session opens a ``REPEATABLE READ, READ ONLY`` transaction and
   exports its snapshot; ``pg_dump --snapshot=<id>`` is relayed into ``restic backup
   --stdin`` (:func:`labkeeper.restic.stream_backup`) while the same session counts
   every table in the same snapshot. restic gets end-of-stream only when pg_dump
   exited 0 *and* the dump ends with its trailer, and only once the manifest's restic
   holds its lock: restic 0.14 retries a lock file that vanishes while it checks the
   lock list (the dump's restic of a small database finishing) for 45-95 s.
3. restic's summary must name a snapshot of one file holding every byte relayed.
4. The waiting restic gets the manifest (row counts, dump size, snapshot id): a
   companion snapshot with the same ``backup:<id>`` tag.
5. A backup needs only a shared lock, so no lock listing up front: when restic finds
   the repository locked (exclusively) it fails before reading anything; stale locks
   are removed, live ones waited for, and the backup starts again.
6. On any failure nothing of the attempt survives (:mod:`labkeeper.pg_backup.cleanup`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from labkeeper import pending as pending_mod
from labkeeper import postgres, process, restic
from labkeeper import progress as progress_mod
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Database, Inventory
from labkeeper.pg_backup import ahead as ahead_mod
from labkeeper.pg_backup.cleanup import (
    CLEANUP_TIMEOUT,
    discard_attempt,
    pending_store,
    sweep_pending,
)
from labkeeper.pg_backup.manifest import DumpInfo, Manifest, build_manifest
from labkeeper.pg_backup.naming import (
    backup_tag,
    dump_filename,
    manifest_filename,
    new_backup_id,
    series_tags,
)
from labkeeper.pg_backup.results import BackupFailed, BackupResult
from labkeeper.pg_backup.targets import client_conn
from labkeeper.restic.repository import open_repo

logger = logging.getLogger(__name__)

MANIFEST_NICE = 19
"""Niceness of the manifest's restic, and of its session's autogroup, while it waits
alongside the dump: its start-up (key derivation, ~0.5 s of CPU) takes what the dump
leaves idle. Once the dump is complete it is back at full priority: the run then waits
for it, and on a busy machine a niced restic would starve. Measured: warm-backup call
3.63 -> 3.21 s median, bare pipeline 2.75 s; its autogroup niced too, pgbench scale 100
through the runner: 4.85 -> 4.75 s."""

MANIFEST_PREFIX = b"{"
"""The manifest's first byte (it is a JSON object), handed to its restic at once:
restic reads it only after taking its lock (:meth:`restic.PendingBackup.wait_reading`)."""

LOCK_HANDOFF_TIMEOUT = 120.0
"""How long the dump's restic is held before end-of-stream waiting for the manifest's
restic to take its lock (then the stream ends anyway, and the run log says so)."""

MAX_LOCK_CONFLICTS = 5
"""Attempts a backup makes when restic finds the repository locked (it waits for the
lock between attempts, within the repository's ``lock_wait_minutes``)."""


class _Background:
    """A function run in a daemon thread; :meth:`result` returns its value or raises
    its exception."""

    def __init__(self, fn: Callable[[], Any], name: str) -> None:
        self._fn = fn
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("background work did not finish in time")
        if self._error is not None:
            raise self._error
        return self._value


class _NoSnapshot(Exception):
    """The producer factory could not open the database snapshot."""

    def __init__(self, error: LabkeeperError) -> None:
        super().__init__(str(error))
        self.error = error


class _Locked(Exception):
    """restic found the repository locked before it read anything."""


@dataclass
class _Job:
    """One database's backup: where it goes and how it is checked."""

    name: str
    db: Database
    repo: restic.Repo
    repo_name: str
    compression: str
    server: str
    host: str
    conn: postgres.Conn
    stall_timeout: float
    pending: pending_mod.PendingStore | None = None
    """Where a failed attempt whose cleanup did not finish is recorded."""
    progress_interval: float = progress_mod.DEFAULT_INTERVAL

    @property
    def filename(self) -> str:
        return dump_filename(self.db.name, self.db.format)

    @property
    def gate(self) -> process.EofGate:
        return (postgres.plain_dump_complete if self.db.format == "plain"
                else postgres.custom_dump_complete)


def backup_database(inv: Inventory, name: str, *,
                    stall_timeout: float = 300.0, backup_id: str | None = None
                    ) -> BackupResult:
    """Back up one database of the inventory (see the module docstring)."""
    db = inv.database(name)
    repo_cfg = inv.repository_for(db)
    job = _Job(name=name, db=db, repo=open_repo(inv, repo_cfg.name), repo_name=repo_cfg.name,
               compression=repo_cfg.compression, server=inv.database_server(db),
               host=inv.lab.name, conn=client_conn(inv, db), stall_timeout=stall_timeout,
               pending=pending_store(inv, name),
               progress_interval=inv.settings.progress_interval)
    taken = ahead_mod.take(inv, name)
    try:
        early = _usable(taken, job, backup_id)
        backup_id = backup_id or (early.backup_id if early else new_backup_id())
        return _backup(job, backup_id, early.early if early else None,
                       lock_deadline=time.monotonic() + repo_cfg.lock_wait_minutes * 60,
                       stale_lock_minutes=repo_cfg.stale_lock_minutes)
    finally:
        if taken is not None:
            taken.early.stop(why="the backup did not use it")  # a no-op once taken over


def _usable(early: ahead_mod.Ahead | None, job: _Job, backup_id: str | None
            ) -> ahead_mod.Ahead | None:
    """The dump's restic started ahead for this database (:mod:`.ahead`), if this
    backup can take it: the same backup id, and no earlier attempt to sweep first (the
    sweep must not meet its lock)."""
    if early is None:
        return None
    assert job.pending is not None
    why = ("another backup id was asked for" if backup_id not in (None, early.backup_id)
           else "earlier failed attempts are swept first" if job.pending.read() else None)
    if why is None:
        return early
    early.early.stop(why=why)
    return None


def _backup(job: _Job, backup_id: str, early: restic.EarlyBackup | None, *,
            lock_deadline: float, stale_lock_minutes: float) -> BackupResult:
    """The backup's attempts: again while restic finds the repository locked."""
    name = job.name
    started = time.monotonic()
    notes, still_pending = _sweep_first(job)
    for _attempt in range(MAX_LOCK_CONFLICTS):
        try:
            result = _backup_once(job, backup_id, notes, early)
            early = None
        except _Locked as locked:
            early = None
            logger.info("%s: %s; waiting for the repository", name, locked)
            notes += restic.wait_for_locks(
                job.repo, exclusive=False, wait=max(0.0, lock_deadline - time.monotonic()),
                stale_after=stale_lock_minutes * 60)
            continue
        result.duration_s = time.monotonic() - started
        result.pending_left = len(still_pending)
        logger.info("%s: snapshot %s (%d bytes, %d new uncompressed) + manifest %s in %.1f s",
                    name, restic.short_id(result.snapshot_id), result.bytes_dumped,
                    result.data_added, restic.short_id(result.manifest_snapshot_id),
                    result.duration_s)
        return result
    raise BackupFailed(f"backup of {name} failed: the repository was locked at each of "
                       f"{MAX_LOCK_CONFLICTS} attempts", transient=True, database=name,
                       backup_id=backup_id)


def _sweep_first(job: _Job) -> tuple[list[str], list[pending_mod.PendingAttempt]]:
    """Earlier failed attempts of this database whose cleanup did not finish are swept
    before the new backup (an unusable pending file fails the backup here, before
    anything runs)."""
    assert job.pending is not None
    waiting = job.pending.read()
    if not waiting:
        return [], []
    logger.info("%s: %d earlier failed attempt(s) await cleanup: %s", job.name, len(waiting),
                ", ".join(f"{a.backup_id} (since {a.since})" for a in waiting))
    notes, left = sweep_pending(job.repo, job.pending)
    if left:
        notes.append(f"{job.name}: {len(left)} earlier failed attempt(s) still await cleanup ("
                     + ", ".join(a.backup_id for a in left) + "); their dumps have no manifest "
                     "and count nowhere, the next backup sweeps them again")
    return notes, left


def _backup_once(job: _Job, backup_id: str, notes: list[str],
                 early: restic.EarlyBackup | None = None) -> BackupResult:
    """One attempt: snapshot, stream with the manifest counted alongside, manifest
    stored. Raises :class:`_Locked` (nothing stored, nothing left) or
    :class:`BackupFailed` (everything of the attempt discarded)."""
    return _Attempt(job, backup_id, notes, early).run()


class _Attempt:
    """One attempt's moving parts: the manifest's waiting restic, the ``psql`` session
    holding the snapshot, the dump's progress, and whether a restic was killed (its
    stale lock is then removed when the attempt is discarded)."""

    def __init__(self, job: _Job, backup_id: str, notes: list[str],
                 early: restic.EarlyBackup | None = None) -> None:
        self.job = job
        self.early = early
        """The dump's restic, started ahead (:mod:`.ahead`), for :meth:`stream`."""
        self.backup_id = backup_id
        self.tag = backup_tag(backup_id)
        self.notes = notes
        self.killed_restic = False
        self.opened: list[tuple[postgres.OpenSnapshot, datetime, _Background]] = []
        logger.info("%s: backup %s of %s on %s into %s", job.name, backup_id, job.conn.dbname,
                    job.server, job.repo_name)
        # The manifest's restic starts now: its start-up (key derivation, lock, index)
        # overlaps the dump, niced so the dump keeps the CPU; it gets the manifest's
        # first byte now (to tell when it holds its lock), the rest and end-of-stream
        # at the end.
        self.pending = restic.PendingBackup(
            job.repo, filename=manifest_filename(job.name), host=job.host,
            tags=[*series_tags(job.server, job.name, "pg_manifest"), self.tag],
            compression=job.compression, nice=MANIFEST_NICE, on_stderr_line=self.restic_said)
        self.pending.prime(MANIFEST_PREFIX)
        self.session = postgres.PsqlSession(job.conn, timeout=600)
        self.progress = progress_mod.Progress(f"{job.name}: dump",
                                              interval=job.progress_interval)

    def restic_said(self, line: str) -> None:
        note = restic.backend_retry(line)
        if note is not None:
            logger.info("%s: %s", self.job.name, note)

    def fail(self, message: str, *, transient: bool) -> BackupFailed:
        """Discard everything of this attempt; the error to raise, saying what was done."""
        job = self.job
        self.session.close(kill=True)
        unlock = self.pending.abort() or self.killed_restic
        cleanup = discard_attempt(job.repo, host=job.host, backup_id=self.backup_id,
                                  unlock=unlock, pending=job.pending)
        return BackupFailed(f"backup of {job.name} failed: {message} [{'; '.join(cleanup)}]",
                            transient=transient, database=job.name, backup_id=self.backup_id)

    def dump_complete(self, tail: bytes, nbytes: int) -> str | None:
        """The dump's own completeness check; then the dump's restic (and its lock)
        is kept until the manifest's restic holds its lock, so no lock vanishes
        under the manifest's restic while it checks the others."""
        problem = self.job.gate(tail, nbytes)
        if problem is None:
            self.pending.full_priority()  # the dump is done: the run now waits for it
        if problem is None and not self.pending.wait_reading(LOCK_HANDOFF_TIMEOUT) \
                and self.pending.running:
            logger.info("%s: the manifest's restic has not taken its lock after %g s; ending "
                        "the dump's stream anyway", self.job.name, LOCK_HANDOFF_TIMEOUT)
        return problem

    def producer(self) -> process.Stage:
        """pg_dump of a snapshot opened now: the dump's restic has already started, so
        opening it overlaps restic's start-up."""
        job, session = self.job, self.session
        try:
            session.start()
            snap = postgres.open_snapshot(session)
        except LabkeeperError as exc:
            raise _NoSnapshot(exc) from None
        logger.info("%s: snapshot %s exported", job.name, snap.snapshot_id)
        # Exact row counts in the same transaction, while pg_dump reads its snapshot.
        counter = _Background(lambda: (postgres.count_rows(session),
                                       postgres.dump_tool_version(session)),
                              name="pg-count-rows")
        self.opened.append((snap, datetime.now(tz=UTC), counter))
        self.progress.set_total(snap.database_size, estimate=True)  # the dump's size differs
        return process.Stage(
            postgres.pg_dump_argv(job.conn, fmt=job.db.format, snapshot=snap.snapshot_id),
            codes=postgres.codes_for(job.conn, postgres.PG_DUMP_CODES), env=job.conn.env(),
            on_bytes=self.progress.add)

    def stream(self) -> restic.StreamResult:
        """pg_dump relayed into restic; restic's lock conflict is :class:`_Locked`."""
        job = self.job
        try:
            return restic.stream_backup(
                job.repo, self.producer, filename=job.filename, host=job.host,
                tags=[*series_tags(job.server, job.name), self.tag], gate=self.dump_complete,
                timeout=job.db.timeout_minutes * 60, compression=job.compression,
                stall_timeout=job.stall_timeout, on_stderr_line=self.restic_said,
                early=self.early)
        except _NoSnapshot as exc:
            self.killed_restic = True  # the dump's restic was started, then SIGKILLed
            raise self.fail(f"could not open a snapshot of {job.conn.dbname}: {exc.error}",
                            transient=exc.error.transient) from None
        except restic.StreamFailed as exc:
            if exc.locked:
                # Nothing was stored. The caller waits for the lock (removing stale
                # ones, the manifest's restic's too if it got a lock before dying).
                self.session.close(kill=True)
                self.pending.abort()
                raise _Locked(str(exc)) from None
            self.killed_restic = not exc.eof_given or exc.cause != "producer"
            said = postgres.name_server(str(exc), job.conn) if exc.cause == "producer" \
                else str(exc)
            raise self.fail(said, transient=exc.transient) from None

    def manifest(self, stream: restic.StreamResult) -> Manifest:
        """The manifest of the dump just stored, its rows counted in the same snapshot."""
        job = self.job
        snap, snapshot_at, counter = self.opened[0]
        try:
            tables, pg_dump_version = counter.result(timeout=600)
        except Exception as exc:
            raise self.fail(f"counting the rows of the snapshot failed: {exc}",
                            transient=getattr(exc, "transient",
                                              isinstance(exc, TimeoutError))) from None
        facts = postgres.SnapshotFacts(snapshot_id=snap.snapshot_id,
                                       server_version=snap.server_version,
                                       database_size=snap.database_size, tables=tables,
                                       wal_lsn=snap.wal_lsn)
        manifest = build_manifest(
            backup_id=self.backup_id, lab=job.host, database=job.name, server=job.server,
            dbname=job.conn.dbname, facts=facts, dump_format=job.db.format,
            compression=job.compression, pg_dump_version=pg_dump_version, now=snapshot_at)
        # restic's summary is the proof (restic.stdin_summary_problem): the snapshot
        # was saved holding one file of exactly the bytes pg_dump wrote, and the
        # relay's gate saw pg_dump's trailer before giving restic end-of-stream.
        manifest.dump = DumpInfo(filename=job.filename, path=f"/{job.filename}",
                                 bytes=stream.bytes, snapshot_id=stream.summary.snapshot_id,
                                 duration_s=round(stream.duration, 3),
                                 data_added=stream.summary.data_added)
        return manifest

    def run(self) -> BackupResult:
        job = self.job
        ok = False
        try:
            stream = self.stream()
            self.progress.finish()
            manifest = self.manifest(stream)
            try:
                msum = _store_manifest(job, self.pending, manifest, self.tag)
            except LabkeeperError as exc:
                self.killed_restic = True
                raise self.fail(f"storing the manifest failed: {exc}",
                                transient=exc.transient) from None
            logger.info("%s: %d tables, %d rows counted in snapshot %s", job.name,
                        manifest.table_count, manifest.total_rows,
                        self.opened[0][0].snapshot_id)
            ok = True
        except (BackupFailed, _Locked):
            raise
        except Exception as exc:  # whatever it was, nothing of this attempt may survive
            self.killed_restic = True  # state unknown: remove the stale locks a killed restic left
            raise self.fail(f"{type(exc).__name__}: {exc}", transient=False) from exc
        finally:
            self.progress.finish()
            self.session.close(kill=not ok)
            self.pending.abort()
        return BackupResult(
            database=job.name, server=job.server, backup_id=self.backup_id,
            snapshot_id=stream.summary.snapshot_id, manifest_snapshot_id=msum.snapshot_id,
            bytes_dumped=stream.bytes, data_added=stream.summary.data_added, duration_s=0.0,
            table_count=manifest.table_count, total_rows=manifest.total_rows,
            notes=self.notes, stream_s=stream.duration)


def _store_manifest(job: _Job, pending: restic.PendingBackup, manifest: Manifest,
                    tag: str) -> restic.BackupSummary:
    """Hand the manifest to its waiting restic; if that one is gone (it failed at
    start-up, or was killed), store the manifest with a fresh restic instead."""
    data = manifest.to_json()
    if pending.running:
        return pending.finish(data, timeout=300)
    if pending.abort():
        restic.unlock(job.repo, timeout=CLEANUP_TIMEOUT)  # the lock a killed restic left
    logger.info("%s: the manifest's restic had stopped early; storing it with a new one",
                job.name)
    return restic.backup_bytes(
        job.repo, data, filename=manifest_filename(job.name), host=job.host,
        tags=[*series_tags(job.server, job.name, "pg_manifest"), tag],
        compression=job.compression, timeout=300)


