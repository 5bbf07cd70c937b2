"""``restic backup --stdin`` owning end-of-stream: a producer's output streamed into
restic with no temporary file (:func:`stream_backup`), and a restic started ahead of
its small data (:class:`PendingBackup`) or of its stream (:func:`start_backup_early`).
restic gets end-of-stream only once the data is proven complete; on any failure it is
SIGKILLed first, so it never stores a snapshot of a partial stream.

``--stdin-from-command`` (0.17+) is deliberately *not* used for dumps: restic would
start pg_dump itself, so the dump could not pass our relay, which is what proves a
stream complete on every version (the end-of-stream gate, the byte count the summary
is checked against, the stall detector, the producer's stderr kept apart from
restic's, the snapshot opened while restic starts). One design for both versions.
"""

from __future__ import annotations

import array
import dataclasses
import fcntl
import os
import select
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from labkeeper import process
from labkeeper.errors import CommandError, CommandTimeout, LabkeeperError
from labkeeper.restic.argv import backup_stdin_argv, unlock_argv
from labkeeper.restic.commands import cached_snapshot_ids, canonical_summary, run_restic
from labkeeper.restic.failures import EXIT_CODES, LOCK_FAILED, classify_failure
from labkeeper.restic.models import BackupSummary, parse_backup_summary, stdin_summary_problem
from labkeeper.restic.repository import Repo
from labkeeper.secrets import REDACTOR


class PendingBackup:
    """``restic backup --stdin`` started ahead of its (small) data, so its start-up —
    key derivation, lock, index load: most of a small backup's time — overlaps other
    work. :meth:`finish` hands it the data and closes its stdin; :meth:`abort`
    SIGKILLs it before any end-of-stream, so it never stores a snapshot (it may leave
    a stale lock: ``restic unlock`` removes it).

    The data is written by a helper thread, and restic's stdout (its ``--json``
    status lines, then the summary) is read continuously, so neither side blocks
    on a full pipe however long the wait is.

    ``nice`` > 0 runs restic at that niceness, its session's autogroup too
    (:class:`labkeeper.process.Coprocess`): its start-up then takes only CPU the work
    it overlaps leaves idle.

    :meth:`prime` hands restic the data's first bytes early; :meth:`wait_reading`
    then tells when restic has read them, which it does only once it has opened the
    repository, taken its lock and loaded the index.
    """

    def __init__(self, repo: Repo, *, filename: str, host: str, tags: Sequence[str],
                 compression: str | None = "auto", nice: int = 0,
                 on_stderr_line: process.LineCallback | None = None) -> None:
        self.filename = filename
        self._repo = repo
        self.argv = backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                                      compression=compression)
        self._cached_before = cached_snapshot_ids(repo)
        self._proc = process.Coprocess(self.argv, env=repo.env(),
                                       on_stderr_line=on_stderr_line, nice=nice,
                                       guard_stdin=True)
        self._primed = b""
        self._stdout: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name="restic-pending-stdout",
                                        daemon=True)
        self._reader.start()
        self.finished = False

    def _read(self) -> None:
        fd = self._proc.stdout.fileno()
        kept = 0
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            self._stdout.append(chunk)
            kept += len(chunk)
            while kept > process.CAPTURE_LIMIT and len(self._stdout) > 1:
                kept -= len(self._stdout.pop(0))  # only the summary at the end matters

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        """restic's process id (``nice`` execs it: the same process)."""
        return self._proc.pid

    def full_priority(self) -> None:
        """Its niceness undone (as far as permitted): what it waits for is ready, and
        the run now waits for it."""
        self._proc.full_priority()

    def prime(self, prefix: bytes) -> None:
        """Write the data's first bytes now (the data :meth:`finish` gets must start
        with them). At most ``PIPE_BUF`` bytes, so the write never blocks."""
        if self.finished or self._primed:
            raise RuntimeError("prime() comes once, before finish() or abort()")
        if not 0 < len(prefix) <= select.PIPE_BUF:
            raise ValueError(f"prefix must be 1..{select.PIPE_BUF} bytes, got {len(prefix)}")
        self._primed = prefix
        try:
            os.write(self._proc.stdin.fileno(), prefix)
        except OSError:
            pass  # restic already died: finish() reports how

    def wait_reading(self, timeout: float) -> bool:
        """Wait until restic has read the primed bytes: it is then past its lock and
        index load. False when it exited first or ``timeout`` seconds passed."""
        if not self._primed or self.finished:
            raise RuntimeError("wait_reading() needs prime() first, before finish()")
        fd = self._proc.stdin.fileno()
        unread = array.array("i", [0])
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None:
            try:
                fcntl.ioctl(fd, termios.FIONREAD, unread)
            except OSError:
                return False
            if unread[0] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return False

    def finish(self, data: bytes, *, timeout: float) -> BackupSummary:
        """Send ``data`` as the whole file, end the stream and return restic's summary
        (checked like a streamed backup's: one file of exactly ``len(data)`` bytes).
        Raises :class:`CommandError` (typed, classified) when restic fails or times out;
        restic is then stopped."""
        if self.finished:
            raise RuntimeError("this backup was already finished or aborted")
        if not data.startswith(self._primed):
            raise ValueError("data does not start with the bytes prime() sent")
        self.finished = True
        feeder = threading.Thread(target=_write_and_end,
                                  args=(self._proc, data[len(self._primed):]),
                                  name="restic-pending-stdin", daemon=True)
        feeder.start()
        timed_out = self._proc.wait(timeout) is None
        if timed_out:
            self._proc.kill()
        self._proc.wait()
        feeder.join(timeout=5)
        self._reader.join(timeout=5)  # before close(): its fd must not be reused under it
        res = self._proc.result(EXIT_CODES)
        self._proc.close(kill=True)
        if timed_out:
            raise CommandTimeout(f"restic backup of {self.filename} timed out after "
                                 f"{timeout:g}s", argv=REDACTOR.redact_argv(self.argv),
                                 timeout=timeout)
        if not res.ok:
            raise classify_failure(process.make_error(res))
        summary = parse_backup_summary(b"".join(self._stdout).decode("utf-8", "replace"))
        problem = stdin_summary_problem(summary, len(data))
        if problem is not None:
            raise CommandError(f"restic backup: {problem}", argv=res.argv,
                               returncode=res.returncode)
        return canonical_summary(self._repo, summary, timeout=timeout,
                                 cached_before=self._cached_before)

    def abort(self) -> bool:
        """SIGKILL restic before it got end-of-stream (no snapshot). Returns whether it
        may have left a stale lock: it was still running, or a signal had killed it."""
        if self.finished:
            return False
        self.finished = True
        was_running = self.running
        self._proc.kill()
        rc = self._proc.wait()
        self._reader.join(timeout=5)  # before close(): its fd must not be reused under it
        self._proc.close(kill=True)
        return was_running or (rc is not None and rc < 0)


def _write_and_end(proc: process.Coprocess, data: bytes) -> None:
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass  # restic died or was killed: its exit status tells why
    finally:
        proc.end_stdin()


# -- streaming a producer into `restic backup --stdin`, owning end-of-stream ----------------

Gate = process.EofGate
"""Decides at the producer's clean exit whether the stream is complete:
``gate(tail_bytes, total_bytes)`` returns None (complete) or why it is not."""

TAIL_BYTES = process.GATE_TAIL_BYTES


class StreamFailed(LabkeeperError):
    """Streaming a producer into restic failed; restic never saw a clean EOF unless
    ``eof_given`` (then restic itself failed afterwards). Pickles without the two
    command results."""

    _pickle_omit = ("producer", "consumer")

    def __init__(self, message: str, *, transient: bool, cause: str,
                 producer: process.CommandResult | None = None,
                 consumer: process.CommandResult | None = None,
                 eof_given: bool = False, bytes_relayed: int = 0,
                 locked: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.cause = cause
        """``producer`` | ``incomplete`` | ``consumer`` | ``stall`` | ``timeout``"""
        self.producer = producer
        self.consumer = consumer
        self.eof_given = eof_given
        self.bytes_relayed = bytes_relayed
        self.locked = locked
        """restic could not lock the repository (another run holds an exclusive lock);
        it stopped before reading anything, so it left neither lock nor snapshot."""


@dataclass(frozen=True)
class StreamResult:
    summary: BackupSummary
    bytes: int
    duration: float
    producer: process.CommandResult
    consumer: process.CommandResult


UNLOCK_TIMEOUT = 30.0
"""Seconds the ``restic unlock`` after stopping an early restic may take."""


@dataclass(frozen=True)
class EarlyBackup:
    """``restic backup --stdin`` started ahead of the :func:`stream_backup` that takes it
    over (:class:`labkeeper.process.EarlyStart`): its start-up overlaps what runs
    before. Never given end-of-stream unless taken; :meth:`stop` (or expiry) SIGINTs
    it, then removes the lock it may have left (``restic unlock``): it stores nothing."""

    process: process.EarlyStart
    cached_before: frozenset[str]
    """The snapshots in restic's cache before it started (:func:`canonical_summary`)."""

    @property
    def waiting(self) -> bool:
        return self.process.waiting

    def stop(self, why: str = "not needed") -> None:
        self.process.stop(why=why)


def start_backup_early(repo: Repo, *, filename: str, host: str, tags: Sequence[str],
                       compression: str | None = "auto", expires: float) -> EarlyBackup:
    """The ``restic backup --stdin`` that :func:`stream_backup` with the same arguments
    would start, started now; stopped unless taken within ``expires`` seconds."""
    argv = backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                             compression=compression)
    cached = cached_snapshot_ids(repo)
    stage = process.Stage(argv, codes=EXIT_CODES, env=repo.env())

    def remove_its_lock() -> None:
        # restic 0.14 stopped in the moment between writing its lock and taking charge
        # of it exits without removing it (measured: every time, right after the lock
        # appears): `restic unlock` removes it (its pid is gone), as after a kill.
        run_restic(repo, unlock_argv(repo), timeout=UNLOCK_TIMEOUT)

    return EarlyBackup(process.EarlyStart(stage, expires=expires,
                                          after_stop=remove_its_lock), cached)


def stream_backup(repo: Repo, producer: process.Stage | process.StageFactory, *,
                  filename: str, host: str,
                  tags: Sequence[str], gate: Gate, timeout: float,
                  compression: str | None = "auto", stall_timeout: float = 300.0,
                  on_stderr_line: process.LineCallback | None = None,
                  early: EarlyBackup | None = None) -> StreamResult:
    """Stream ``producer``'s stdout into ``restic backup --stdin`` with no temporary file.

    A two-stage :func:`labkeeper.process.pipeline` whose producer carries ``gate`` as
    its end-of-stream gate: restic's stdin is closed while restic lives only after the
    producer exited with an ok code *and* ``gate(tail, nbytes)`` accepted the stream.
    On any failure restic is SIGKILLed before EOF (it then leaves a stale lock and
    maybe unreferenced packs, never a snapshot). If restic accepts no data for
    ``stall_timeout`` seconds (its backend is down), both are killed. Raises
    :class:`StreamFailed`.

    ``producer`` may be a factory (:data:`labkeeper.process.StageFactory`): restic
    then starts first and the factory's work overlaps restic's start-up; what the
    factory raises propagates (restic was killed before any input).

    ``on_stderr_line`` gets restic's stderr line by line as it comes.

    ``early`` (:func:`start_backup_early`): that restic is taken over when it is still
    waiting and was started with these arguments; else restic starts here (and a
    mismatched early one is stopped).
    """
    consumer_argv = backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                                      compression=compression)
    first: process.Stage | process.StageFactory
    if isinstance(producer, process.Stage):
        first = dataclasses.replace(producer, eof_gate=gate)
    else:
        def first() -> process.Stage:
            return dataclasses.replace(producer(), eof_gate=gate)
    # Read before the restic that may save the snapshot started.
    cached_before = early.cached_before if early is not None and early.waiting \
        else cached_snapshot_ids(repo)
    res = process.pipeline(
        [first, process.Stage(consumer_argv, codes=EXIT_CODES, env=repo.env(),
                              on_stderr_line=on_stderr_line,
                              early=early.process if early is not None else None)],
        timeout=timeout, stall_timeout=stall_timeout, check=False)
    failure = _stream_failure(res, timeout=timeout, stall_timeout=stall_timeout)
    if failure is not None:
        raise failure
    return _proven(repo, res, cached_before)


def _stream_failure(res: process.PipelineResult, *, timeout: float,
                    stall_timeout: float) -> StreamFailed | None:
    """Why the stream did not end in a snapshot restic reports, or None."""
    p_res, c_res = res.stages
    nbytes = res.bytes_relayed[0]
    eof_given = res.eof_given[0]
    what = p_res.argv[0]
    if res.stalled:
        restic_said = c_res.stderr_tail(3).replace("\n", " | ")
        return StreamFailed(
            f"restic accepted no data for {stall_timeout:g} s (repository backend "
            f"unreachable?); stopped it before end-of-stream, no snapshot was finalised"
            + (f". restic: {restic_said}" if restic_said else ""),
            transient=True, cause="stall", producer=p_res, consumer=c_res,
            eof_given=eof_given, bytes_relayed=nbytes)
    if res.timed_out:
        return StreamFailed(
            f"{what} | restic backup timed out after {timeout:g} s; restic was stopped "
            "before end-of-stream, no snapshot was finalised",
            transient=True, cause="timeout", producer=p_res, consumer=c_res,
            eof_given=eof_given, bytes_relayed=nbytes)
    if res.refused[0] is not None:
        return StreamFailed(
            f"{what} exited {p_res.returncode} but its output is incomplete "
            f"({res.refused[0]}); restic was stopped before end-of-stream, no snapshot "
            "was finalised",
            transient=False, cause="incomplete", producer=p_res, consumer=c_res,
            bytes_relayed=nbytes)
    if res.cause == 0:
        return StreamFailed(
            f"{process.make_error(p_res)} — restic was stopped before end-of-stream after "
            f"{nbytes} bytes, no snapshot was finalised",
            transient=any(s in p_res.stderr for s in _PRODUCER_TRANSIENT), cause="producer",
            producer=p_res, consumer=c_res, bytes_relayed=nbytes)
    if c_res.returncode != 0 or not eof_given:
        return _consumer_failure(res)
    return None


def _consumer_failure(res: process.PipelineResult) -> StreamFailed:
    """restic failed (or never got end-of-stream) after a clean producer."""
    p_res, c_res = res.stages
    nbytes = res.bytes_relayed[0]
    eof_given = res.eof_given[0]
    err = classify_failure(process.make_error(c_res)) if c_res.returncode else None
    why = str(err) if err else f"restic exited {c_res.returncode}"
    return StreamFailed(
        f"{why} (after {nbytes} bytes of {p_res.argv[0]}'s output"
        + ("" if eof_given else "; it never received end-of-stream") + ")",
        transient=bool(err and err.transient), cause="consumer", producer=p_res,
        consumer=c_res, eof_given=eof_given, bytes_relayed=nbytes,
        locked=bool(err and err.meaning == LOCK_FAILED))


def _proven(repo: Repo, res: process.PipelineResult, cached_before: frozenset[str]
            ) -> StreamResult:
    """The stream's result once restic's summary proves a snapshot of exactly the bytes
    relayed, named by its full id; else :class:`StreamFailed`."""
    p_res, c_res = res.stages
    nbytes = res.bytes_relayed[0]

    def failed(message: str, transient: bool = False) -> StreamFailed:
        return StreamFailed(message, transient=transient, cause="consumer", producer=p_res,
                            consumer=c_res, eof_given=True, bytes_relayed=nbytes)

    try:
        summary = parse_backup_summary(c_res.stdout)
    except ValueError as exc:
        raise failed(str(exc)) from None
    problem = stdin_summary_problem(summary, nbytes)
    if problem is not None:
        raise failed(problem)
    try:
        summary = canonical_summary(repo, summary, cached_before=cached_before)
    except (LabkeeperError, ValueError) as exc:
        raise failed(f"snapshot {summary.snapshot_id} saved, but its full id could not be "
                     f"read: {exc}", getattr(exc, "transient", False)) from None
    return StreamResult(summary=summary, bytes=nbytes, duration=res.duration,
                        producer=p_res, consumer=c_res)


_PRODUCER_TRANSIENT = ("could not connect", "Connection refused", "server closed the connection",
                       "timeout expired", "the database system is starting up",
                       "the database system is shutting down", "too many clients",
                       "connection to server", "terminating connection")

