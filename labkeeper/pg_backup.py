"""Nightly PostgreSQL backups: consistent manifest, pg_dump streamed into restic, proof.

One database backup (:func:`backup_database`) costs two restic runs, overlapped:

1. **Manifest's restic, started first.** ``restic backup --stdin`` for
   ``<db>.manifest.json`` starts at once and waits for its data
   (:class:`labkeeper.restic.PendingBackup`): its start-up (key derivation, lock,
   index) overlaps the dump instead of following it.
2. **Snapshot.** One ``psql`` session opens a ``REPEATABLE READ, READ ONLY``
   transaction and exports its snapshot (``pg_export_snapshot()``).
3. **Stream, with the manifest counted alongside.** ``pg_dump --snapshot=<that id>``
   is relayed into ``restic backup --stdin`` with no temporary file, while the same
   session counts every table exactly in the same snapshot. restic gets
   end-of-stream only when pg_dump exited 0 *and* the dump ends with its
   ``-- PostgreSQL database dump complete`` trailer
   (:func:`labkeeper.restic.stream_backup`); otherwise restic is killed first.
   Before that end-of-stream, the dump's restic is held until the manifest's restic
   has taken its own lock: restic 0.14 retries a lock file that vanishes while it
   checks the lock list (the dump's restic of a small database finishing) for
   45-95 s. restic's backend retries are written to the run log as they happen.
4. **Proof.** restic's ``--json`` summary, printed after the snapshot was saved,
   must name a snapshot of exactly one file and account for every byte relayed
   (:func:`labkeeper.restic.stdin_summary_problem`).
5. **Manifest stored with the dump.** The waiting restic gets the manifest (table
   counts, dump size and snapshot id) and only then its end-of-stream: a companion
   snapshot carrying the same ``backup:<id>`` tag (the drill finds the newest
   ``kind:pg_dump`` snapshot of a series, then the ``kind:pg_manifest`` snapshot
   with the same ``backup:`` tag: :func:`find_latest_backup`).
6. **Locks.** No lock listing up front (each restic run costs a key derivation):
   a backup needs only a shared lock, so it is blocked only by an exclusive one,
   and then restic fails before reading anything. The attempt is dropped, stale
   locks (dead process on this host, or older than ``stale_lock_minutes``) are
   removed with ``restic unlock`` and said so, live ones waited for with backoff,
   and the backup starts again. (A stale *shared* lock blocks no backup; the
   maintenance flow, which needs an exclusive lock, removes it.)
7. **Nothing half-done survives.** On any failure every snapshot carrying this
   attempt's ``backup:<id>`` tag is forgotten and the locks killed restics left are
   removed (``restic unlock``, stale locks only). When that ``forget`` cannot run
   (the repository is unreachable or locked at that moment), the attempt is recorded
   in ``<settings.state_dir>/pg_backup/pending-<db>.json`` (:mod:`labkeeper.pending`,
   shared with path backups) and the next backup of the database forgets its
   snapshots first (:func:`sweep_pending`; if that fails again the backup still runs
   and says so). Until then its dump has no manifest, and a dump without a manifest
   counts as a backup nowhere: not in ``status`` (:func:`complete_dumps`), not for a
   drill or a restore (:func:`find_latest_backup`), and retention forgets such
   leftovers before its policy runs (:func:`incomplete_dumps`).

Snapshots: ``--host <lab name>``; tags ``labkeeper``, ``db:<server>/<name>``,
``kind:pg_dump`` | ``kind:pg_manifest``, ``backup:<id>``. A *series* is a lab
host plus the stable tags; retention (``restic forget``) runs per series with
``--group-by host`` after filtering by those tags, so the per-run ``backup:`` tag
never splits a series into one-snapshot groups (see :func:`retention_series`).

Format (measured, ``benchmarks/``): plain ``pg_dump`` + restic ``--compression
auto`` uploads the least on a typical night; gzip/``-Fc`` zlib defeat dedup.
"""

from __future__ import annotations

import json
import os
import secrets as pysecrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from labkeeper import pending as pending_mod
from labkeeper import pg_container, postgres, process, restic
from labkeeper import progress as progress_mod
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.inventory import Database, Inventory
from labkeeper.secrets import redact, resolve

MANIFEST_FORMAT = 1
LABKEEPER_VERSION = "0.1.0"
CLEANUP_TIMEOUT = 90.0

Log = Callable[[str], None]


def _labkeeper_version() -> str:
    try:
        from importlib.metadata import version

        return version("labkeeper")
    except Exception:
        return LABKEEPER_VERSION


# -- naming (pure) -----------------------------------------------------------------------

def new_backup_id(now: datetime | None = None) -> str:
    """A unique id per backup attempt: ``20260101T020000Z-1a2b3c``."""
    now = now or datetime.now(tz=UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{pysecrets.token_hex(3)}"


def backup_tag(backup_id: str) -> str:
    return f"backup:{backup_id}"


def series_tags(server: str, name: str, kind: str = "pg_dump") -> list[str]:
    """The stable tags of one database's series (kind ``pg_dump`` or ``pg_manifest``)."""
    return ["labkeeper", f"db:{server}/{name}", f"kind:{kind}"]


def globals_tags(server_label: str) -> list[str]:
    return ["labkeeper", f"server:{server_label}", "kind:pg_globals"]


def dump_filename(name: str, fmt: str = "plain") -> str:
    return f"{name}.sql" if fmt == "plain" else f"{name}.dump"


def manifest_filename(name: str) -> str:
    return f"{name}.manifest.json"


def backup_id_of(snapshot: restic.Snapshot) -> str | None:
    for t in snapshot.tags:
        if t.startswith("backup:"):
            return t[len("backup:"):]
    return None


# -- the manifest ------------------------------------------------------------------------

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


# -- where things are (inventory → resolved targets) -------------------------------------

def repo_cache_dir(inv: Inventory, repo_name: str,
                   environ: Mapping[str, str] | None = None) -> Path:
    """restic's persistent cache for one repository (B2 bills list/download calls): the
    inventory's ``cache_dir`` (the repository's, else ``settings.cache_dir/<name>``),
    else ``$RESTIC_CACHE_DIR`` when set (never silently overridden), else
    ``settings.state_dir/cache/<name>``."""
    r = inv.repository(repo_name)
    if r.cache_dir is not None:
        return r.cache_dir
    if inv.settings.cache_dir is not None:
        return inv.settings.cache_dir / repo_name
    from_env = (os.environ if environ is None else environ).get("RESTIC_CACHE_DIR", "")
    if os.path.isabs(from_env):
        return Path(from_env)
    return inv.settings.effective_cache_dir / repo_name


def open_repo(inv: Inventory, repo_name: str) -> restic.Repo:
    from labkeeper.doctor import repo_for

    cache = repo_cache_dir(inv, repo_name)
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:  # say what to set, not only what failed
        raise ConfigError(
            f"cannot create restic's cache directory {cache} ({exc.strerror}): set "
            "settings.cache_dir or settings.state_dir in the inventory (or "
            "$RESTIC_CACHE_DIR) to a directory this user can write") from None
    return repo_for(inv, repo_name, cache_dir=str(cache))


def conn_for(inv: Inventory, db: Database, *, dbname: str | None = None) -> postgres.Conn:
    if db.container is not None:  # the tools run in the server's container
        return pg_container.container_conn(inv, db, dbname=dbname)
    host, port = inv.database_address(db)
    return postgres.Conn(host=host, port=port, dbname=dbname or db.effective_dbname,
                         user=db.user, password=resolve(db.password) if db.password else None,
                         sslmode=db.sslmode,
                         sslrootcert=str(db.sslrootcert) if db.sslrootcert else None)


def client_conn(inv: Inventory, db: Database, *, dbname: str | None = None) -> postgres.Conn:
    """:func:`conn_for` with client tools that can dump this server: the container's
    own, or the installed client matching the server's major version. Fails before
    anything is dumped (:class:`BackupFailed`) when none is installed (the message
    names the package). A server that cannot be asked now gets the default client:
    opening the snapshot then fails and says why, as it always did."""
    conn = conn_for(inv, db, dbname=dbname)
    try:
        return pg_container.matching(conn)
    except postgres.ClientMissing as exc:
        raise BackupFailed(f"backup of {db.name} failed before dumping: {exc}",
                           transient=False, database=db.name) from None
    except LabkeeperError:
        return conn


def server_label(inv: Inventory, db: Database) -> str:
    """``host:port`` of a database's server (globals are per server)."""
    _host, port = inv.database_address(db)
    return f"{inv.database_server(db)}:{port}"


# -- results -----------------------------------------------------------------------------

@dataclass
class BackupResult:
    database: str
    server: str
    backup_id: str
    snapshot_id: str
    manifest_snapshot_id: str
    bytes_dumped: int
    data_added: int
    duration_s: float
    table_count: int
    total_rows: int
    notes: list[str] = field(default_factory=list)
    stream_s: float = 0.0
    """Seconds of the pg_dump → restic stream alone (the rest: locks, manifest, proof)."""
    pending_left: int = 0
    """Earlier failed attempts whose cleanup is still pending after this run's sweep."""

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_dumped / 1e6 / self.duration_s if self.duration_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "database": self.database, "status": "warning" if self.pending_left else "ok",
            "snapshot": self.snapshot_id[:8],
            "bytes dumped": self.bytes_dumped,
            "bytes added (uncompressed)": self.data_added,
            "duration s": round(self.duration_s, 2), "stream s": round(self.stream_s, 2),
            "throughput MB/s": round(self.throughput_mb_s, 1),
            "tables": self.table_count, "backup id": self.backup_id,
            "notes": redact("; ".join(self.notes)),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BackupFailed(LabkeeperError):
    """One database's backup failed; nothing of this attempt is left counted as good."""

    def __init__(self, message: str, *, transient: bool = False, database: str = "",
                 backup_id: str = "") -> None:
        super().__init__(redact(message), transient=transient)
        self.database = database
        self.backup_id = backup_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_failed, (self.message, self.transient, self.database, self.backup_id))


def _rebuild_failed(message: str, transient: bool, database: str, backup_id: str) -> BackupFailed:
    return BackupFailed(message, transient=transient, database=database, backup_id=backup_id)


# -- cleanup -----------------------------------------------------------------------------

def discard_attempt(repo: restic.Repo, *, host: str, backup_id: str, unlock: bool,
                    log: Log, timeout: float = CLEANUP_TIMEOUT,
                    pending: pending_mod.PendingStore | None = None) -> list[str]:
    """Forget every snapshot of one failed attempt and remove the lock a killed restic
    left. When the forget cannot be done the attempt is recorded in ``pending`` for the
    next backup of the series to sweep (:func:`sweep_pending`). Returns what was done
    (or why it could not be)."""
    notes: list[str] = []
    try:
        leftovers = restic.find_snapshots(repo, tags=[backup_tag(backup_id)], host=host,
                                          timeout=timeout)
        if leftovers:
            restic.forget_ids(repo, [s.id for s in leftovers], timeout=timeout)
            notes.append("forgot snapshot(s) " + ", ".join(s.short_id or s.id[:8]
                                                           for s in leftovers)
                         + f" of failed attempt {backup_id}")
        else:
            notes.append(f"no snapshot of attempt {backup_id} exists")
    except LabkeeperError as exc:
        notes.append(f"could not list/forget snapshots of attempt {backup_id}: {exc}")
        notes.append(record_pending(pending, backup_id, host=host, reason=notes[-1]))
    if unlock:
        try:
            restic.unlock(repo, timeout=timeout)
            notes.append("removed the stale lock of the stopped restic (restic unlock)")
        except LabkeeperError as exc:
            notes.append(f"restic unlock failed: {exc}")
    for n in notes:
        log(n)
    return notes


# -- failed attempts whose cleanup did not finish (labkeeper.pending) --------------------

PENDING_DIR = "pg_backup"
INCOMPLETE_GRACE_S = 25 * 60
"""Beyond the database's ``timeout_minutes``: how long after its dump snapshot's time a
backup may still store its manifest (row counts 600 s, manifest 300 s, a replacement
manifest restic 300 s, margin). A dump without a manifest older than that is a
leftover of a failed attempt, never a backup in flight."""


def pending_owner(name: str, series: str) -> pending_mod.Owner:
    """One database's pending file: ``<state_dir>/pg_backup/pending-<db>.json`` (an
    inventory database name is unique in the lab and cannot hold ``.`` or ``/``)."""
    return pending_mod.Owner(PENDING_DIR, (("database", name, "database"),), series)


def pending_store(inv: Inventory, name: str) -> pending_mod.PendingStore:
    db = inv.database(name)
    series = f"db:{inv.database_server(db)}/{db.name}"
    return pending_mod.PendingStore(inv.settings.state_dir, pending_owner(db.name, series))


def record_pending(store: pending_mod.PendingStore | None, backup_id: str, *, host: str,
                   reason: str) -> str:
    """Remember a failed attempt whose snapshots could not be forgotten; returns the
    note saying so (or how to do it by hand when even that failed)."""
    tag = backup_tag(backup_id)
    by_hand = f"forget its snapshots with `restic forget --tag {tag} --host {host}`"
    if store is None:
        return f"attempt {backup_id} is not cleaned up: {by_hand}"
    try:
        store.add(pending_mod.new_pending(backup_id, snapshot_host=host, reason=reason))
    except (OSError, LabkeeperError) as exc:
        return (f"attempt {backup_id} is not cleaned up and could not be recorded as pending "
                f"in {store.path} ({exc}): {by_hand}")
    return (f"recorded attempt {backup_id} as pending cleanup in {store.path}: the next "
            f"backup of {store.owner.label} first forgets every snapshot tagged {tag}")


def sweep_pending(repo: restic.Repo, store: pending_mod.PendingStore, *, log: Log,
                  timeout: float = CLEANUP_TIMEOUT
                  ) -> tuple[list[str], list[pending_mod.PendingAttempt]]:
    """Forget every snapshot of each pending attempt of this database; an attempt leaves
    the file only once that succeeded. Returns (what was done, the attempts still
    pending). Nothing of a pending attempt runs any more (its restics were stopped
    before it was recorded), so a failed sweep does not stop the new backup."""
    label = store.owner.label
    notes: list[str] = []
    left: list[pending_mod.PendingAttempt] = []
    done: list[str] = []
    try:
        for attempt in store.read():
            try:
                leftovers = restic.find_snapshots(repo, tags=[attempt.tag],
                                                  host=attempt.snapshot_host, timeout=timeout)
                if leftovers:
                    restic.forget_ids(repo, [s.id for s in leftovers], timeout=timeout)
                step = "forgot snapshot(s) " + ", ".join(s.id for s in leftovers) \
                    if leftovers else "no snapshot of it exists"
            except LabkeeperError as exc:
                left.append(attempt)
                note = (f"{label}: cleanup of earlier failed attempt {attempt.backup_id} "
                        f"(pending since {attempt.since}) is still incomplete: {exc}; a dump "
                        f"without a manifest tagged {attempt.tag} may remain in the series "
                        f"(never counted as a backup); it stays pending in {store.path}")
            else:
                done.append(attempt.backup_id)
                note = (f"{label}: swept earlier failed attempt {attempt.backup_id} (pending "
                        f"cleanup since {attempt.since}): {step}")
            notes.append(note)
            log(note)
    finally:
        try:
            store.remove(done)
        except (OSError, LabkeeperError) as exc:  # swept again next time: harmless
            notes.append(f"could not update the pending-cleanup file {store.path}: {exc}")
            log(notes[-1])
    return notes, left


# -- complete backups only (status, drills, retention) ----------------------------------

def manifested_ids(snapshots: list[restic.Snapshot]) -> set[str]:
    """The backup ids that have a manifest snapshot among ``snapshots``."""
    return {bid for s in snapshots if "kind:pg_manifest" in s.tags
            and (bid := backup_id_of(s)) is not None}


def complete_dumps(snapshots: list[restic.Snapshot]) -> list[restic.Snapshot]:
    """The dump snapshots that are backups: their manifest (same ``backup:`` tag) is
    stored. A dump without one is the leftover of a failed attempt (or one in flight)
    and never counts."""
    done = manifested_ids(snapshots)
    return [s for s in snapshots if "kind:pg_dump" in s.tags and backup_id_of(s) in done]


def incomplete_dumps(snapshots: list[restic.Snapshot], *, now: datetime, grace_s: float,
                     failed: set[str] | frozenset[str] = frozenset()
                     ) -> tuple[list[restic.Snapshot], list[restic.Snapshot]]:
    """Dump snapshots without a manifest, split into (leftovers: recorded as failed in
    ``failed`` or older than ``grace_s``; young: possibly a backup still in flight)."""
    done = manifested_ids(snapshots)
    leftovers: list[restic.Snapshot] = []
    young: list[restic.Snapshot] = []
    for s in snapshots:
        bid = backup_id_of(s)
        if "kind:pg_dump" not in s.tags or bid in done:
            continue
        old = (now - s.time).total_seconds() > grace_s
        (leftovers if old or bid in failed else young).append(s)
    return leftovers, young


# -- one database ------------------------------------------------------------------------

MANIFEST_NICE = 19
"""Niceness of the manifest's restic while it waits alongside the dump (measured:
warm-backup call time 3.63 -> 3.21 s median, bare pipeline 2.75 s)."""

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
    log: Log
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


def backup_database(inv: Inventory, name: str, *, log: Log = print,
                    stall_timeout: float = 300.0, backup_id: str | None = None
                    ) -> BackupResult:
    """Back up one database of the inventory (see the module docstring)."""
    db = inv.database(name)
    repo_cfg = inv.repository_for(db)
    job = _Job(name=name, db=db, repo=open_repo(inv, repo_cfg.name), repo_name=repo_cfg.name,
               compression=repo_cfg.compression, server=inv.database_server(db),
               host=inv.lab.name, conn=client_conn(inv, db), stall_timeout=stall_timeout,
               log=log, pending=pending_store(inv, name),
               progress_interval=inv.settings.progress_interval)
    backup_id = backup_id or new_backup_id()
    started = time.monotonic()
    lock_deadline = started + repo_cfg.lock_wait_minutes * 60
    notes, still_pending = _sweep_first(job)
    for _attempt in range(MAX_LOCK_CONFLICTS):
        try:
            result = _backup_once(job, backup_id, notes)
        except _Locked as locked:
            log(f"{name}: {locked}; waiting for the repository")
            notes += restic.wait_for_locks(
                job.repo, exclusive=False, wait=max(0.0, lock_deadline - time.monotonic()),
                stale_after=repo_cfg.stale_lock_minutes * 60, log=log)
            continue
        result.duration_s = time.monotonic() - started
        result.pending_left = len(still_pending)
        log(f"{name}: snapshot {restic.short_id(result.snapshot_id)} ({result.bytes_dumped} "
            f"bytes, {result.data_added} new uncompressed) + manifest "
            f"{restic.short_id(result.manifest_snapshot_id)} in {result.duration_s:.1f} s")
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
    job.log(f"{job.name}: {len(waiting)} earlier failed attempt(s) await cleanup: "
            + ", ".join(f"{a.backup_id} (since {a.since})" for a in waiting))
    notes, left = sweep_pending(job.repo, job.pending, log=job.log)
    if left:
        notes.append(f"{job.name}: {len(left)} earlier failed attempt(s) still await cleanup ("
                     + ", ".join(a.backup_id for a in left) + "); their dumps have no manifest "
                     "and count nowhere, the next backup sweeps them again")
    return notes, left


def _backup_once(job: _Job, backup_id: str, notes: list[str]) -> BackupResult:
    """One attempt: snapshot, stream with the manifest counted alongside, manifest
    stored. Raises :class:`_Locked` (nothing stored, nothing left) or
    :class:`BackupFailed` (everything of the attempt discarded)."""
    name, repo, log = job.name, job.repo, job.log
    tag = backup_tag(backup_id)
    log(f"{name}: backup {backup_id} of {job.conn.dbname} on {job.server} into "
        f"{job.repo_name}")

    def restic_said(line: str) -> None:
        note = restic.backend_retry(line)
        if note is not None:
            log(f"{name}: {note}")

    # The manifest's restic starts now: its start-up (key derivation, lock, index)
    # overlaps the dump, niced so the dump keeps the CPU; it gets the manifest's
    # first byte now (to tell when it holds its lock), the rest and end-of-stream at
    # the end.
    pending = restic.PendingBackup(
        repo, filename=manifest_filename(name), host=job.host,
        tags=[*series_tags(job.server, name, "pg_manifest"), tag], compression=job.compression,
        nice=MANIFEST_NICE, on_stderr_line=restic_said)
    pending.prime(MANIFEST_PREFIX)
    session = postgres.PsqlSession(job.conn, timeout=600)
    ok = False
    killed_restic = False

    def fail(message: str, *, transient: bool) -> BackupFailed:
        session.close(kill=True)
        unlock = pending.abort() or killed_restic
        cleanup = discard_attempt(repo, host=job.host, backup_id=backup_id, unlock=unlock,
                                  log=log, pending=job.pending)
        return BackupFailed(f"backup of {name} failed: {message} [{'; '.join(cleanup)}]",
                            transient=transient, database=name, backup_id=backup_id)

    opened: list[tuple[postgres.OpenSnapshot, datetime, _Background]] = []
    progress = progress_mod.Progress(f"{name}: dump", log=log, interval=job.progress_interval)

    def dump_complete(tail: bytes, nbytes: int) -> str | None:
        """The dump's own completeness check; then the dump's restic (and its lock)
        is kept until the manifest's restic holds its lock, so no lock vanishes
        under the manifest's restic while it checks the others."""
        problem = job.gate(tail, nbytes)
        if problem is None and not pending.wait_reading(LOCK_HANDOFF_TIMEOUT) \
                and pending.running:
            log(f"{name}: the manifest's restic has not taken its lock after "
                f"{LOCK_HANDOFF_TIMEOUT:g} s; ending the dump's stream anyway")
        return problem

    def producer() -> process.Stage:
        """pg_dump of a snapshot opened now: the dump's restic has already started, so
        opening it overlaps restic's start-up."""
        try:
            session.start()
            snap = postgres.open_snapshot(session)
        except LabkeeperError as exc:
            raise _NoSnapshot(exc) from None
        log(f"{name}: snapshot {snap.snapshot_id} exported")
        # Exact row counts in the same transaction, while pg_dump reads its snapshot.
        counter = _Background(lambda: (postgres.count_rows(session),
                                       postgres.dump_tool_version(session)),
                              name="pg-count-rows")
        opened.append((snap, datetime.now(tz=UTC), counter))
        progress.set_total(snap.database_size, estimate=True)  # the dump's size differs
        return process.Stage(
            postgres.pg_dump_argv(job.conn, fmt=job.db.format, snapshot=snap.snapshot_id),
            codes=postgres.codes_for(job.conn, postgres.PG_DUMP_CODES), env=job.conn.env(),
            on_bytes=progress.add)

    try:
        try:
            stream = restic.stream_backup(
                repo, producer, filename=job.filename, host=job.host,
                tags=[*series_tags(job.server, name), tag], gate=dump_complete,
                timeout=job.db.timeout_minutes * 60, compression=job.compression,
                stall_timeout=job.stall_timeout, on_stderr_line=restic_said)
        except _NoSnapshot as exc:
            killed_restic = True  # the dump's restic was started, then SIGKILLed
            raise fail(f"could not open a snapshot of {job.conn.dbname}: {exc.error}",
                       transient=exc.error.transient) from None
        except restic.StreamFailed as exc:
            if exc.locked:
                # Nothing was stored. The caller waits for the lock (removing stale
                # ones, the manifest's restic's too if it got a lock before dying).
                session.close(kill=True)
                pending.abort()
                raise _Locked(str(exc)) from None
            killed_restic = not exc.eof_given or exc.cause != "producer"
            said = postgres.name_server(str(exc), job.conn) if exc.cause == "producer" \
                else str(exc)
            raise fail(said, transient=exc.transient) from None
        progress.finish()
        snap, snapshot_at, counter = opened[0]
        try:
            tables, pg_dump_version = counter.result(timeout=600)
        except Exception as exc:
            raise fail(f"counting the rows of the snapshot failed: {exc}",
                       transient=getattr(exc, "transient", isinstance(exc, TimeoutError))
                       ) from None
        summary = stream.summary
        facts = postgres.SnapshotFacts(snapshot_id=snap.snapshot_id,
                                       server_version=snap.server_version,
                                       database_size=snap.database_size, tables=tables,
                                       wal_lsn=snap.wal_lsn)
        manifest = build_manifest(
            backup_id=backup_id, lab=job.host, database=name, server=job.server,
            dbname=job.conn.dbname, facts=facts, dump_format=job.db.format,
            compression=job.compression, pg_dump_version=pg_dump_version, now=snapshot_at)
        # restic's summary is the proof (restic.stdin_summary_problem): the snapshot
        # was saved holding one file of exactly the bytes pg_dump wrote, and the
        # relay's gate saw pg_dump's trailer before giving restic end-of-stream.
        manifest.dump = DumpInfo(filename=job.filename, path=f"/{job.filename}",
                                 bytes=stream.bytes, snapshot_id=summary.snapshot_id,
                                 duration_s=round(stream.duration, 3),
                                 data_added=summary.data_added)
        try:
            msum = _store_manifest(job, pending, manifest, tag)
        except LabkeeperError as exc:
            killed_restic = True
            raise fail(f"storing the manifest failed: {exc}", transient=exc.transient) from None
        log(f"{name}: {manifest.table_count} tables, {manifest.total_rows} rows counted in "
            f"snapshot {snap.snapshot_id}")
        ok = True
    except (BackupFailed, _Locked):
        raise
    except Exception as exc:  # whatever it was, nothing of this attempt may survive
        killed_restic = True  # state unknown: remove the stale locks a killed restic left
        raise fail(f"{type(exc).__name__}: {exc}", transient=False) from exc
    finally:
        progress.finish()
        session.close(kill=not ok)
        pending.abort()
    return BackupResult(
        database=name, server=job.server, backup_id=backup_id,
        snapshot_id=summary.snapshot_id, manifest_snapshot_id=msum.snapshot_id,
        bytes_dumped=stream.bytes, data_added=summary.data_added, duration_s=0.0,
        table_count=manifest.table_count, total_rows=manifest.total_rows, notes=notes,
        stream_s=stream.duration)


def _store_manifest(job: _Job, pending: restic.PendingBackup, manifest: Manifest,
                    tag: str) -> restic.BackupSummary:
    """Hand the manifest to its waiting restic; if that one is gone (it failed at
    start-up, or was killed), store the manifest with a fresh restic instead."""
    data = manifest.to_json()
    if pending.running:
        return pending.finish(data, timeout=300)
    if pending.abort():
        restic.unlock(job.repo, timeout=CLEANUP_TIMEOUT)  # the lock a killed restic left
    job.log(f"{job.name}: the manifest's restic had stopped early; storing it with a new one")
    return restic.backup_bytes(
        job.repo, data, filename=manifest_filename(job.name), host=job.host,
        tags=[*series_tags(job.server, job.name, "pg_manifest"), tag],
        compression=job.compression, timeout=300)


# -- globals (roles, tablespaces) per server ---------------------------------------------

@dataclass
class GlobalsResult:
    server: str
    status: str  # ok | warning
    detail: str
    snapshot_id: str = ""
    bytes_dumped: int = 0
    role_passwords: bool = False

    def row(self) -> dict[str, Any]:
        return {"database": f"globals {self.server}", "status": self.status,
                "snapshot": self.snapshot_id[:8], "bytes dumped": self.bytes_dumped,
                "bytes added (uncompressed)": 0, "duration s": 0, "throughput MB/s": 0,
                "tables": 0, "backup id": "", "notes": redact(self.detail)}


def globals_servers(inv: Inventory, names: list[str]) -> dict[str, list[str]]:
    """Server label → the selected databases on it that ask for globals."""
    out: dict[str, list[str]] = {}
    for n in names:
        db = inv.database(n)
        if db.globals:
            out.setdefault(server_label(inv, db), []).append(n)
    return out


def backup_globals(inv: Inventory, label: str, databases: list[str], *, log: Log = print,
                   stall_timeout: float = 300.0) -> GlobalsResult:
    """``pg_dumpall --globals-only`` of one server into the repository of its first
    database. A role that may not read ``pg_authid`` (not a superuser) gets a dump
    without role passwords and a warning; a dump that fails anyway is a warning too,
    never silence. Raises only for repository trouble (transient)."""
    db = inv.database(databases[0])
    repo_cfg = inv.repository_for(db)
    repo = open_repo(inv, repo_cfg.name)
    try:
        conn = client_conn(inv, db)
    except BackupFailed as exc:
        log(f"globals of {label} NOT backed up: {exc}")
        return GlobalsResult(server=label, status="warning",
                             detail=redact(f"globals of {label} NOT backed up: {exc}"))
    host = inv.lab.name
    filename = "globals-" + label.replace(":", "-").replace("/", "-") + ".sql"
    warnings: list[str] = []
    attempts = (True, False)
    try:
        readable = postgres.query(
            conn, "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT');", timeout=60)
    except LabkeeperError as exc:
        detail = f"globals of {label} NOT backed up: cannot connect to check privileges: {exc}"
        log(detail)
        return GlobalsResult(server=label, status="warning", detail=redact(detail))
    if readable and readable[0] == ["f"]:
        attempts = (False,)
        note = (f"role {conn.user} may not read pg_authid (not a superuser): globals "
                "dumped WITHOUT role passwords (--no-role-passwords)")
        warnings.append(note)
        log(note)
    for with_passwords in attempts:
        backup_id = new_backup_id()
        producer = process.Stage(
            postgres.pg_dumpall_globals_argv(conn, role_passwords=with_passwords),
            codes=postgres.PG_DUMPALL_CODES, env=conn.env())
        try:
            stream = restic.stream_backup(
                repo, producer, filename=filename, host=host,
                tags=[*globals_tags(label), backup_tag(backup_id)],
                gate=postgres.globals_dump_complete, timeout=1800,
                compression=repo_cfg.compression, stall_timeout=stall_timeout)
        except restic.StreamFailed as exc:
            discard_attempt(repo, host=host, backup_id=backup_id,
                            unlock=not exc.eof_given or exc.cause != "producer", log=log)
            stderr = exc.producer.stderr if exc.producer else ""
            if exc.cause != "producer":
                raise BackupFailed(f"globals of {label}: {exc}", transient=exc.transient,
                                   database=f"globals {label}") from None
            if with_passwords and "permission denied" in stderr:
                note = (f"role {conn.user} may not read pg_authid (not a superuser): "
                        "globals dumped WITHOUT role passwords (--no-role-passwords)")
                warnings.append(note)
                log(note)
                continue
            detail = f"globals of {label} NOT backed up: {exc}"
            log(detail)
            return GlobalsResult(server=label, status="warning", detail=redact(detail))
        detail = "; ".join(warnings) or "roles (with passwords) and tablespaces"
        log(f"globals of {label}: snapshot {restic.short_id(stream.summary.snapshot_id)} "
            f"({stream.bytes} bytes): {detail}")
        return GlobalsResult(server=label, status="warning" if warnings else "ok",
                             detail=redact(detail), snapshot_id=stream.summary.snapshot_id,
                             bytes_dumped=stream.bytes, role_passwords=with_passwords)
    raise AssertionError("unreachable")  # pragma: no cover


# -- for the DR drill: find a backup and its manifest ------------------------------------

@dataclass(frozen=True)
class StoredBackup:
    dump: restic.Snapshot
    manifest: restic.Snapshot | None
    backup_id: str


def find_backups(repo: restic.Repo, *, lab: str, server: str, name: str,
                 timeout: float = 120) -> list[StoredBackup]:
    """Every complete backup of one database's series, oldest first (dump snapshots
    paired with their manifest snapshot by ``backup:`` tag)."""
    snaps = restic.find_snapshots(repo, tags=["labkeeper", f"db:{server}/{name}"], host=lab,
                                  timeout=timeout)
    manifests = {backup_id_of(s): s for s in snaps if "kind:pg_manifest" in s.tags}
    out = []
    for s in snaps:
        bid = backup_id_of(s)
        if "kind:pg_dump" in s.tags and bid:
            out.append(StoredBackup(dump=s, manifest=manifests.get(bid), backup_id=bid))
    return out


def find_latest_backup(repo: restic.Repo, *, lab: str, server: str, name: str
                       ) -> StoredBackup | None:
    """The newest dump of the series that has its manifest."""
    complete = [b for b in find_backups(repo, lab=lab, server=server, name=name) if b.manifest]
    return complete[-1] if complete else None


def read_manifest(repo: restic.Repo, backup: StoredBackup) -> Manifest:
    if backup.manifest is None:
        raise BackupFailed(f"backup {backup.backup_id} has no manifest snapshot")
    path = backup.manifest.paths[0] if backup.manifest.paths else ""
    return parse_manifest(restic.dump_file(repo, backup.manifest.id, path))


# -- retention series (repo maintenance) -------------------------------------------------

@dataclass(frozen=True)
class Series:
    """One retention series: the lab's snapshots carrying all of ``tags``."""

    label: str
    host: str
    tags: tuple[str, ...]


def retention_series(inv: Inventory, repo_name: str) -> list[Series]:
    """The dump series of every database in a repository, and each server's globals.
    Manifests are not a series: they follow their dumps (:func:`orphan_manifests`)."""
    out: list[Series] = []
    seen: set[str] = set()
    for db in inv.databases:
        if inv.repository_for(db).name != repo_name:
            continue
        server = inv.database_server(db)
        out.append(Series(f"db:{server}/{db.name}", inv.lab.name,
                          tuple(series_tags(server, db.name))))
        label = server_label(inv, db)
        if db.globals and label not in seen:
            seen.add(label)
            out.append(Series(f"globals:{label}", inv.lab.name, tuple(globals_tags(label))))
    return out


def orphan_manifests(snapshots: list[restic.Snapshot]) -> list[restic.Snapshot]:
    """Manifest snapshots whose dump snapshot (same ``backup:`` tag) is gone."""
    dumps = {backup_id_of(s) for s in snapshots if "kind:pg_dump" in s.tags}
    return [s for s in snapshots
            if "kind:pg_manifest" in s.tags and backup_id_of(s) not in dumps]


# -- healthchecks-style pings ------------------------------------------------------------

