"""Continuous WAL archiving: the spool, the ``pg_receivewal`` supervisor, shipping.

- **Receive.** ``pg_receivewal`` with a replication slot (so the server keeps WAL
  until it is received, across restarts of the receiver) writes segments into a
  local spool; the segment being written is ``<name>.partial``. :class:`WalReceiver`
  creates the slot if needed, runs the receiver (``--no-loop``: a lost connection
  ends it, the supervisor restarts it with backoff and logs why) until stopped.
- **Ship.** :func:`ship` (every ``ship_interval_minutes``): optionally closes the
  server's current segment (``pg_switch_wal``, a no-op without new WAL) so the RPO is
  the ship interval; then every *completed* file of the spool (segments and timeline
  history files, never ``.partial``) goes as one tar stream into one
  ``restic backup --stdin`` (tags ``kind:wal``, ``pg:<server>``,
  ``wal:<first>-<last>``), under the same end-of-stream gate and byte-count proof
  as the dumps; the snapshot is then looked up in the repository by its ``backup:``
  tag, and only then are those files removed from the spool. A failed ship leaves
  the spool untouched (and no snapshot: the attempt is forgotten).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labkeeper import log_setup, pg_backup, postgres, process, restic
from labkeeper.errors import LabkeeperError
from labkeeper.pitr import PitrError, models
from labkeeper.pitr.target import PitrTarget

logger = logging.getLogger(__name__)

PG_RECEIVEWAL_CODES = process.ExitCodeTable("pg_receivewal", {
    0: process.ExitCode("success", "ok"),
    1: process.ExitCode("pg_receivewal failed", "transient"),
})
MAX_BATCH = 512
"""Files per ship (8 GiB of 16 MiB segments): a backlog ships in several runs."""
SWITCH_WAIT_S = 30.0


# -- argv (pure) -------------------------------------------------------------------------

def _conn_args(conn: postgres.Conn) -> tuple[str, ...]:
    return ("-h", conn.host, "-p", str(conn.port), "-U", conn.user, "--no-password")


def create_slot_argv(conn: postgres.Conn, slot: str) -> tuple[str, ...]:
    return conn.argv(("pg_receivewal", *_conn_args(conn), "--slot", slot, "--create-slot",
                      "--if-not-exists"))


def receive_argv(conn: postgres.Conn, spool: Path, slot: str, *,
                 synchronous: bool = False) -> tuple[str, ...]:
    argv = ("pg_receivewal", *_conn_args(conn), "-D", str(spool), "--slot", slot,
            "--no-loop", "--verbose")
    if synchronous:
        argv += ("--synchronous",)
    return conn.argv(argv)


def tar_argv(spool: Path, names: list[str]) -> tuple[str, ...]:
    return ("tar", "--create", "--file=-", "--format=gnu", f"--directory={spool}", "--",
            *names)


# -- the spool (pure listing) ------------------------------------------------------------

def ready_files(spool: Path) -> list[str]:
    """Completed WAL files waiting in the spool, in WAL order (history files first)."""
    try:
        names = os.listdir(spool)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if models.is_wal_file(n))


def partial_file(spool: Path) -> str | None:
    try:
        names = sorted(n for n in os.listdir(spool) if n.endswith(".partial"))
    except FileNotFoundError:
        return None
    return names[-1] if names else None


def batch_of(names: list[str], limit: int = MAX_BATCH) -> list[str]:
    """The files one ship takes: history files, then the oldest segments (pure). A
    batch without any segment is not shipped (its range would be empty)."""
    history = [n for n in names if models.HISTORY_RE.match(n)]
    segments = [n for n in names if models.SEGMENT_RE.match(n)][:max(1, limit - len(history))]
    return [*history, *segments] if segments else []


# -- receive -----------------------------------------------------------------------------

def ensure_slot(target: PitrTarget, *, timeout: float = 60) -> None:
    process.run(create_slot_argv(target.conn, target.server.slot_name), timeout=timeout,
                codes=postgres.codes_for(target.conn, PG_RECEIVEWAL_CODES),
                env=target.conn.env())


def prepare_spool(spool: Path) -> None:
    spool.mkdir(parents=True, exist_ok=True, mode=0o700)


@dataclass
class ReceiverState:
    starts: int = 0
    last_exit: str = ""
    history: list[str] = field(default_factory=list)


def _stderr_line(line: str) -> None:
    """One line pg_receivewal wrote on stderr, logged as it is."""
    logger.info("%s", line)


class WalReceiver:
    """Supervises ``pg_receivewal`` for one server until :meth:`stop` (or ``stop_event``).

    Each (re)start first makes sure the slot exists. An exit is logged with its
    stderr's last line; restarts back off 1, 2, 4 ... 60 s, reset after a run that
    lasted a minute."""

    def __init__(self, target: PitrTarget, *, stop_event: threading.Event | None = None,
                 max_backoff: float = 60.0) -> None:
        self.target = target
        self.stop_event = stop_event or threading.Event()
        self.max_backoff = max_backoff
        self.state = ReceiverState()
        self._proc: process.Coprocess | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        self.stop_event.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGINT)  # pg_receivewal flushes and exits
            if proc.wait(10) is None:
                proc.kill()

    def run(self) -> ReceiverState:
        backoff = 1.0
        prepare_spool(self.target.spool)
        while not self.stop_event.is_set():
            began = time.monotonic()
            try:
                self._run_once()
            except LabkeeperError as exc:
                self._note(f"pg_receivewal could not start: {exc}")
            if self.stop_event.is_set():
                break
            backoff = 1.0 if time.monotonic() - began > 60 else min(backoff * 2,
                                                                      self.max_backoff)
            logger.info("%s: restarting pg_receivewal in %g s", self.target.name, backoff)
            self.stop_event.wait(backoff)
        return self.state

    def _run_once(self) -> None:
        t = self.target
        ensure_slot(t)
        argv = receive_argv(t.conn, t.spool, t.server.slot_name,
                            synchronous=t.server.synchronous)
        with self._lock:
            if self.stop_event.is_set():
                return
            self._proc = process.Coprocess(argv, env=t.conn.env(),
                                           on_stderr_line=log_setup.in_context(_stderr_line))
            self.state.starts += 1
        logger.info("%s: pg_receivewal started (pid %s) into %s, slot %s", t.name,
                    self._proc.pid, t.spool, t.server.slot_name)
        while self._proc.wait(1.0) is None and not self.stop_event.is_set():
            pass
        if self.stop_event.is_set():
            return
        res = self._proc.result(PG_RECEIVEWAL_CODES)
        self._note(f"pg_receivewal exited {res.returncode} ({res.meaning})"
                   + (f": {res.stderr_tail(1)}" if res.stderr else ""))

    def _note(self, text: str) -> None:
        self.state.last_exit = text
        self.state.history.append(text)
        logger.info("%s: %s", self.target.name, text)


# -- ship --------------------------------------------------------------------------------

@dataclass
class ShipResult:
    server: str
    files: list[str]
    snapshot_id: str = ""
    bytes: int = 0
    duration_s: float = 0.0
    left_in_spool: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def first(self) -> str:
        segs = [f for f in self.files if models.SEGMENT_RE.match(f)]
        return segs[0] if segs else ""

    @property
    def last(self) -> str:
        segs = [f for f in self.files if models.SEGMENT_RE.match(f)]
        return segs[-1] if segs else ""

    def row(self) -> dict[str, Any]:
        return {"server": self.server, "status": "ok", "files": len(self.files),
                "range": f"{self.first}..{self.last}" if self.files else "",
                "snapshot": self.snapshot_id[:8], "bytes": self.bytes,
                "duration s": round(self.duration_s, 2), "left in spool": self.left_in_spool,
                "notes": "; ".join(self.notes)}


SWITCH_SQL = "SELECT pg_walfile_name(pg_switch_wal() - 1);"


def segment_arrived(name: str, ready: list[str], partial: str | None) -> bool:
    """Whether the receiver is past segment ``name`` (pure): it is in the spool, or a later
    segment is (completed or being written). With no new WAL, pg_switch_wal names the
    segment before the current one, long shipped: the receiver writing a later one
    says so."""
    if not models.SEGMENT_RE.match(name):
        return True
    segments = [n for n in ready if models.SEGMENT_RE.match(n)]
    if name in segments or (segments and segments[-1] > name):
        return True
    return partial is not None and partial[:24] > name


def switch_wal(target: PitrTarget, *, wait: float = SWITCH_WAIT_S) -> str | None:
    """Close the server's current segment and wait until the receiver completed it in the
    spool. Returns a note when it could not (the ship then takes what is there)."""
    try:
        rows = postgres.query(target.conn, SWITCH_SQL, timeout=60)
    except LabkeeperError as exc:
        return f"pg_switch_wal failed ({exc}); shipping the completed segments only"
    name = rows[0][0] if rows and rows[0] else ""
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if segment_arrived(name, ready_files(target.spool), partial_file(target.spool)):
            return None
        time.sleep(0.2)
    note = (f"segment {name} (closed by pg_switch_wal) did not arrive in the spool within "
            f"{wait:g} s: is `labkeeper wal receive {target.name}` running?")
    logger.info("%s: %s", target.name, note)
    return note


def ship(target: PitrTarget, *, switch: bool | None = None,
         stall_timeout: float = 120.0, limit: int = MAX_BATCH) -> ShipResult:
    """Ship completed spool files into the repository (see the module docstring)."""
    started = time.monotonic()
    notes: list[str] = []
    covered_until: float | None = None
    if switch if switch is not None else target.server.switch_wal:
        switched_at = time.time()
        note = switch_wal(target)
        if note:
            notes.append(note)
        else:  # every commit before switched_at is in a completed segment now
            covered_until = switched_at
    ready = ready_files(target.spool)
    names = batch_of(ready, limit)
    if not names:
        if covered_until is not None:
            notes.append(_mark(target, covered_until))
        return ShipResult(target.name, [], duration_s=time.monotonic() - started,
                          notes=[*notes, "nothing to ship"])
    if len(names) < len(ready):
        covered_until = None  # a backlog: this batch does not reach the switch
    result = _ship_batch(target, names, stall_timeout=stall_timeout,
                         covered_until=covered_until)
    for n in names:
        with contextlib.suppress(FileNotFoundError):
            (target.spool / n).unlink()
    result.left_in_spool = len(ready_files(target.spool))
    result.notes = notes + result.notes
    result.duration_s = time.monotonic() - started
    logger.info("%s: shipped %d WAL file(s) %s..%s as snapshot %s; removed them from the "
                "spool (%d left)", target.name, len(names), result.first, result.last,
                restic.short_id(result.snapshot_id), result.left_in_spool)
    return result


def _mark(target: PitrTarget, covered_until: float) -> str:
    """Nothing new to ship, yet the server's segment was closed: record that the archive
    reaches this moment (a tiny ``kind:walmark`` snapshot; retention keeps the newest)."""
    when = datetime.fromtimestamp(covered_until, tz=UTC).isoformat()
    try:
        restic.backup_bytes(target.repo, json.dumps({"walto": when}).encode() + b"\n",
                            filename="walmark.json", host=target.host,
                            tags=models.walmark_tags(target.name, covered_until),
                            compression=target.compression, timeout=300)
    except LabkeeperError as exc:
        raise PitrError(f"recording the archive mark of {target.name} failed: {exc}",
                        transient=exc.transient) from None
    return f"archive complete up to {when}"


def _ship_batch(target: PitrTarget, names: list[str], *, stall_timeout: float,
                covered_until: float | None = None) -> ShipResult:
    shipped = ShipResult(target.name, names)
    backup_id = pg_backup.new_backup_id()
    tag = pg_backup.backup_tag(backup_id)
    try:
        stream = restic.stream_backup(
            target.repo, process.Stage(tar_argv(target.spool, names)),
            filename=models.wal_filename(shipped.first, shipped.last), host=target.host,
            tags=[*models.wal_tags(target.name, shipped.first, shipped.last,
                                   covered_until=covered_until), tag],
            gate=models.tar_tail_problem, timeout=3600, compression=target.compression,
            stall_timeout=stall_timeout)
        found = restic.find_snapshots(target.repo, tags=[tag], host=target.host, timeout=120)
    except LabkeeperError as exc:
        unlock = not getattr(exc, "eof_given", True) or getattr(exc, "cause", "") != "producer"
        cleanup = pg_backup.discard_attempt(target.repo, host=target.host,
                                            backup_id=backup_id, unlock=unlock)
        raise PitrError(f"shipping WAL of {target.name} failed ({len(names)} file(s) stay in "
                        f"the spool): {exc} [{'; '.join(cleanup)}]",
                        transient=exc.transient) from None
    if [s.id for s in found] != [stream.summary.snapshot_id]:
        raise PitrError(f"shipping WAL of {target.name}: snapshot "
                        f"{restic.short_id(stream.summary.snapshot_id)} is not listed by the "
                        f"repository; {len(names)} file(s) stay in the spool", transient=True)
    shipped.snapshot_id = stream.summary.snapshot_id
    shipped.bytes = stream.bytes
    return shipped
