"""The one subprocess runner: argv tuples, deadlines, pipefail pipelines, typed errors.

- Commands are argv tuples; there is no shell anywhere.
- Every call has a timeout; on expiry the whole process group is killed.
- Secrets reach children through ``env`` (never argv); argv, stderr and the
  errors we raise are masked with :data:`labkeeper.secrets.REDACTOR`. A child
  inherits only an allowlist of this process's environment (:func:`inherited_env`:
  PATH, HOME, locale, TZ, TMPDIR, proxies, ...) plus what its caller passes.
- Pipelines connect stage *i*'s stdout to stage *i+1*'s stdin through a relay
  owned by this module (``os.splice``, zero-copy). End-of-stream belongs to us:
  a consumer's stdin is closed only after its producer has **exited cleanly**.
  If a producer fails, every later stage is SIGKILLed before its stdin is
  closed, so a consumer (restic) never sees a clean EOF of a truncated stream.
- A producer stage may carry an **end-of-stream gate** (``Stage.eof_gate``): after
  it exited cleanly, ``gate(tail, nbytes)`` must accept its stream (e.g. a dump's
  trailer is present) before the consumer gets EOF; a refusal SIGKILLs every later
  stage instead. Gated relays copy through userspace (``os.read``/``os.write``) to
  keep the last :data:`GATE_TAIL_BYTES`.
- ``pipeline(..., stall_timeout=...)``: a consumer that accepts no data for that
  long (a backend that went away) gets the whole pipeline killed, consumers first,
  before any EOF; the failure is transient.
- Long-lived children with pipes (a ``psql`` session) use :class:`Coprocess`, under
  the same environment, redaction and process-group rules.
- Exit codes are read through one :class:`ExitCodeTable` per tool; a code the
  table does not know is an error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from labkeeper.errors import CommandError, CommandNotFound, CommandTimeout, PipelineError
from labkeeper.secrets import REDACTOR

log = logging.getLogger("labkeeper.process")

Outcome = Literal["ok", "warning", "transient", "permanent"]
STDERR_TAIL_LINES = 20
CAPTURE_LIMIT = 8 * 1024 * 1024  # bytes of stdout/stderr kept in a result
KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL on timeout
_SPLICE_CHUNK = 1 << 20
GATE_TAIL_BYTES = 4096  # bytes of a gated stream's end handed to its gate
_COPY_CHUNK = 1 << 20  # read size of a userspace (gated) relay
_WRITE_SLICE = 1 << 18  # write size of a userspace relay: stall detection granularity
_PIPE_SIZE = 1 << 20  # gated relays grow their pipes to this (F_SETPIPE_SZ)
_F_SETPIPE_SZ = 1031
_LINE_CAP = 1 << 16  # longest line handed to a callback in one piece
LINGER_GRACE = 2.0  # seconds a finished command's leftover children may hold its pipes


@dataclass(frozen=True)
class ExitCode:
    meaning: str
    outcome: Outcome


@dataclass(frozen=True)
class ExitCodeTable:
    """What a tool's exit codes mean. Codes not listed are errors."""

    tool: str
    codes: Mapping[int, ExitCode]

    def classify(self, returncode: int) -> ExitCode:
        if returncode in self.codes:
            return self.codes[returncode]
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            return ExitCode(f"killed by {name}", "permanent")
        return ExitCode(f"unknown exit code {returncode} for {self.tool}", "permanent")


GENERIC = ExitCodeTable("command", {0: ExitCode("success", "ok")})


@dataclass(frozen=True)
class CommandResult:
    """What a finished command did. ``argv`` is redacted. Shared with the SSH runner."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    meaning: str = "success"
    outcome: Outcome = "ok"
    host: str = "localhost"
    truncated: bool = False
    """True when stdout or stderr exceeded :data:`CAPTURE_LIMIT` and was cut."""

    @property
    def ok(self) -> bool:
        return self.outcome in ("ok", "warning")

    @property
    def warning(self) -> bool:
        return self.outcome == "warning"

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        return "\n".join(self.stderr.splitlines()[-lines:])


EofGate = Callable[[bytes, int], "str | None"]
"""``gate(tail, nbytes)``: called after a producer exited cleanly, with the last
:data:`GATE_TAIL_BYTES` of its stream and the stream's length; returns None when
the stream is complete, otherwise why it is not (the consumer then never gets EOF)."""


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline did. Tuples ``bytes_relayed``, ``eof_given`` and ``refused``
    have one entry per relay (relay *i* connects stage *i* to stage *i+1*)."""

    stages: tuple[CommandResult, ...]
    duration: float
    bytes_relayed: tuple[int, ...] = ()
    eof_given: tuple[bool, ...] = ()
    """Whether stage *i+1* got a clean end-of-stream while it was alive."""
    refused: tuple[str | None, ...] = ()
    """Why relay *i* withheld EOF although its producer exited cleanly (the gate's
    refusal, or a relay error); None when it did not."""
    stalled: bool = False
    """A consumer accepted no data for ``stall_timeout``: every stage was killed."""
    timed_out: bool = False
    cause: int | None = None
    """Index of the stage whose failure made the pipeline fail (the earliest failed
    stage that was not killed by us); None when every stage is ok."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.stages)

    @property
    def stdout(self) -> str:
        return self.stages[-1].stdout

    @property
    def last(self) -> CommandResult:
        return self.stages[-1]


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline."""

    argv: tuple[str, ...]
    codes: ExitCodeTable = GENERIC
    env: Mapping[str, str] = field(default_factory=dict)
    on_stderr_line: Callable[[str], None] | None = None
    eof_gate: EofGate | None = None
    """On a producer (not the last stage): decides at its clean exit whether its
    consumer may get EOF; see :data:`EofGate`."""
    on_bytes: Callable[[int], None] | None = None
    """On a producer: called from the relay with the size of each chunk handed to its
    consumer (progress, :mod:`labkeeper.progress`); must not raise."""

    def __post_init__(self) -> None:
        check_argv(self.argv)


LineCallback = Callable[[str], None]

StageFactory = Callable[[], Stage]
"""A pipeline's first stage, made only once every later stage has started: whatever
the factory does (open a database snapshot the producer needs, say) overlaps their
start-up (restic's key derivation). If it raises, the started stages are SIGKILLed
before any input and the exception propagates unchanged."""


def check_argv(argv: Sequence[str]) -> None:
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a sequence of strings, not one string (no shells here)")
    if not argv:
        raise ValueError("argv is empty")
    for i, a in enumerate(argv):
        if not isinstance(a, str):
            raise TypeError(f"argv[{i}] is {type(a).__name__}, not str")
        if "\x00" in a:
            raise ValueError(f"argv[{i}] contains a NUL byte")


def make_error(result: CommandResult, *, killed_because: str = "") -> CommandError:
    """The typed error for a failed result, carrying exit code and stderr tail."""
    tail = result.stderr_tail()
    last = tail.splitlines()[-1] if tail else ""
    why = killed_because or result.meaning
    message = f"{result.argv[0]} failed on {result.host} (exit {result.returncode}: {why})"
    if last:
        message += f": {last}"
    return CommandError(
        message,
        argv=result.argv,
        returncode=result.returncode,
        stderr_tail=tail,
        meaning=why,
        transient=result.outcome == "transient",
    )


class _Capture:
    """Reads a pipe line by line in a thread: keeps a capped copy and calls back."""

    def __init__(self, stream: object, callback: LineCallback | None, name: str) -> None:
        self._stream = stream
        self._callback = callback
        self._chunks: list[bytes] = []
        self._size = 0
        self.truncated = False
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = self._stream
        # Lines are read with a cap so output without newlines stays bounded too.
        for raw in iter(lambda: stream.readline(_LINE_CAP), b""):  # type: ignore[attr-defined]
            if self._size + len(raw) <= CAPTURE_LIMIT:
                self._chunks.append(raw)
                self._size += len(raw)
            else:
                self.truncated = True
            if self._callback is not None:
                line = REDACTOR.redact(raw.decode("utf-8", "replace").rstrip("\r\n"))
                try:
                    self._callback(line)
                except Exception:  # a broken callback must not stall the pipe
                    log.exception("line callback failed")
        with contextlib.suppress(OSError):
            stream.close()  # type: ignore[attr-defined]

    def text(self) -> str:
        self.thread.join()
        data = b"".join(self._chunks).decode("utf-8", "replace")
        return REDACTOR.redact(data)


_SETPRIV = shutil.which("setpriv")


def dies_with_parent(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` run so that it is SIGKILLed when this process dies (``setpriv
    --pdeathsig KILL``, util-linux): a consumer whose stdin we feed must never see a
    clean end-of-stream because *we* were killed (restic would store a truncated
    dump). ``argv`` unchanged where setpriv is missing. The command must exist (checked
    here, so a missing one is still :class:`CommandNotFound`)."""
    if _SETPRIV is None:
        return tuple(argv)
    if shutil.which(argv[0]) is None:
        raise CommandNotFound(f"{argv[0]}: command not found",
                              argv=REDACTOR.redact_argv(tuple(argv)))
    return (_SETPRIV, "--pdeathsig", "KILL", "--", *argv)


BASE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "RESTIC_CACHE_DIR",
    # libpq's file locations (never a secret itself): verify-full's root CA, ~/.pgpass
    "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGPASSFILE", "PGSERVICEFILE",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "PYTHONPATH", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV",
})
"""What a child inherits from this process's environment (plus ``LC_*``); everything
else (every ``env:`` secret of the worker) stays behind. A child gets what its caller
passes in ``env=`` on top. :data:`EXTRA_ENV_VARIABLE` names more to pass on."""
EXTRA_ENV_VARIABLE = "LABKEEPER_CHILD_ENV"
"""Comma-separated names of further variables children inherit (an operator's
escape hatch: ``LABKEEPER_CHILD_ENV=GOMAXPROCS,PGSSLROOTCERT``)."""


def inherited_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of ``environ`` (default: ``os.environ``) a child inherits."""
    environ = os.environ if environ is None else environ
    extra = {n.strip() for n in environ.get(EXTRA_ENV_VARIABLE, "").split(",") if n.strip()}
    return {k: v for k, v in environ.items()
            if k in BASE_ENV_NAMES or k.startswith("LC_") or k in extra}


def _child_env(extra: Mapping[str, str] | None, base: Mapping[str, str] | None) -> dict[str, str]:
    env = inherited_env() if base is None else dict(base)
    if extra:
        env.update(extra)
    return env


def _alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has not exited yet, without reaping it. (``Popen.poll`` answers
    None while another thread holds its wait lock, which would make us count a child
    that died on its own as one we killed.)"""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped meanwhile by another thread
        return False


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _grow_pipe(fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


class Coprocess:
    """A long-lived child talking over pipes (e.g. a ``psql`` session), under the
    runner's rules: an argv tuple (no shell), ``env`` added to the inherited
    allowlist (:func:`inherited_env`; ``base_env`` replaces it), its own process
    group (:meth:`kill` SIGKILLs the group), stderr read in a thread (capped, redacted).

    :attr:`stdin` and :attr:`stdout` are the raw binary pipes; the caller owns the
    protocol spoken over them and its deadlines. Use :func:`run`/:func:`pipeline`
    for anything that runs to completion.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 base_env: Mapping[str, str] | None = None, cwd: str | None = None,
                 on_stderr_line: LineCallback | None = None) -> None:
        check_argv(argv)
        self.argv = tuple(argv)
        self.started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                dies_with_parent(self.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=_child_env(env, base_env), cwd=cwd,
                start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise CommandNotFound(f"{self.argv[0]}: command not found",
                                  argv=REDACTOR.redact_argv(self.argv)) from None
        self._stderr = _Capture(self._proc.stderr, on_stderr_line, f"{self.argv[0]}-stderr")

    @property
    def stdin(self) -> Any:
        """The child's stdin (binary, buffered: flush after writing)."""
        return self._proc.stdin

    @property
    def stdout(self) -> Any:
        """The child's stdout (binary); read its ``fileno()`` with select for deadlines."""
        return self._proc.stdout

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def poll(self) -> int | None:
        return self._proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the child is still running after ``timeout``."""
        try:
            return self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGKILL the child's process group (a no-op once it exited)."""
        _kill_group(self._proc, signal.SIGKILL)

    def result(self, codes: ExitCodeTable = GENERIC) -> CommandResult:
        """The finished child as a result (stderr redacted); waits for it to exit."""
        rc = self._proc.wait()
        code = codes.classify(rc)
        return CommandResult(argv=REDACTOR.redact_argv(self.argv), returncode=rc, stdout="",
                             stderr=self._stderr.text(),
                             duration=time.monotonic() - self.started, meaning=code.meaning,
                             outcome=code.outcome, truncated=self._stderr.truncated)

    def close(self, *, timeout: float = 10.0, kill: bool = False) -> int:
        """End the child: close its stdin (a polite end) and wait up to ``timeout``,
        then SIGKILL its group (at once with ``kill``). Returns the exit code."""
        proc = self._proc
        if not kill and proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                assert proc.stdin is not None
                proc.stdin.close()
            if self.wait(timeout) is None:
                kill = True
        if kill:
            self.kill()
        rc = proc.wait()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, AttributeError, ValueError):
                stream.close()  # type: ignore[union-attr]
        self._stderr.thread.join(timeout=5)
        return rc


class _Relay(threading.Thread):
    """Moves bytes from a producer's stdout to a consumer's stdin; owns the EOF.

    Without a gate it splices (zero-copy); with one it copies through userspace and
    keeps the stream's last :data:`GATE_TAIL_BYTES` for the gate. ``writing_since``
    is set while data waits to be accepted by the consumer (for stall detection).
    """

    def __init__(self, index: int, src: int, dst: int, run: _Run, *,
                 gate: EofGate | None, watch: bool) -> None:
        super().__init__(name=f"relay-{index}", daemon=True)
        self.index = index
        self.src = src
        self.dst = dst
        self.run_ = run
        self.gate = gate
        self.watch = watch
        self.bytes = 0
        self.tail = b""
        self.on_bytes = run.stages[index].on_bytes
        self.writing_since: float | None = None
        self.consumer_gone = False
        self.refused: str | None = None
        self.eof_given = False

    def run(self) -> None:
        try:
            if self.gate is not None:
                self._copy()
            else:
                self._pump()
        except BaseException as exc:  # never hand out EOF of a stream we lost track of
            log.exception("relay %d failed", self.index + 1)
            self.refused = f"relay error: {exc}"
        finally:
            self.writing_since = None
            self.run_.producer_done(self.index, self)

    def _pump(self) -> None:
        use_splice = hasattr(os, "splice")
        poller = None
        if self.watch:
            # Wait for input outside the stall clock: splice blocks on either end.
            poller = select.poll()
            poller.register(self.src, select.POLLIN)
        while True:
            if poller is not None:
                poller.poll()
                self.writing_since = time.monotonic()
            try:
                if use_splice:
                    n = os.splice(self.src, self.dst, _SPLICE_CHUNK)
                else:  # pragma: no cover - non-Linux
                    data = os.read(self.src, _SPLICE_CHUNK)
                    n = len(data)
                    if n:
                        os.write(self.dst, data)
            except BrokenPipeError:
                self.consumer_gone = True
                return
            except OSError as exc:
                if use_splice and exc.errno in (22, 38):  # EINVAL/ENOSYS: fall back
                    use_splice = False
                    continue
                self.consumer_gone = True
                return
            finally:
                self.writing_since = None
            if n == 0:
                return
            self.bytes += n
            if self.on_bytes is not None:
                self.on_bytes(n)

    def _copy(self) -> None:
        _grow_pipe(self.src)
        _grow_pipe(self.dst)
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        while True:
            n = os.readv(self.src, [buf])
            if n == 0:
                return
            off = 0
            while off < n:
                end = min(n, off + _WRITE_SLICE)
                self.writing_since = time.monotonic()
                try:
                    off += os.write(self.dst, view[off:end])
                except OSError:  # EPIPE: the consumer exited or was killed
                    self.consumer_gone = True
                    return
                finally:
                    self.writing_since = None
            self.bytes += n
            if self.on_bytes is not None:
                self.on_bytes(n)
            if n >= GATE_TAIL_BYTES:
                self.tail = bytes(view[n - GATE_TAIL_BYTES:n])
            else:
                self.tail = (self.tail + bytes(view[:n]))[-GATE_TAIL_BYTES:]


def _is_ok(outcome: Outcome) -> bool:
    return outcome in ("ok", "warning")


class _Run:
    """Executes stages, applies the deadline and the stall timeout, collects results."""

    def __init__(self, stages: Sequence[Stage | StageFactory], *, timeout: float,
                 stall_timeout: float | None,
                 env: Mapping[str, str] | None, cwd: str | None,
                 input_data: bytes | None, stdin_fd: int | None,
                 stdout_fd: int | None, on_stdout_line: LineCallback | None) -> None:
        self.factory: StageFactory | None = None
        if not isinstance(stages[0], Stage):
            self.factory = stages[0]
        self.stages: list[Stage] = [s for s in stages if isinstance(s, Stage)]
        """Every stage, in order, once :meth:`execute` has made the first one."""
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.deadline = time.monotonic() + timeout
        self.env = env
        self.cwd = cwd
        self.input_data = input_data
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.on_stdout_line = on_stdout_line
        self.procs: list[subprocess.Popen[bytes]] = []
        self.exit_times: dict[int, float] = {}
        self.killed_because: dict[int, str] = {}
        self.timed_out = False
        self.stalled = False
        self.lock = threading.Lock()
        self.relays: list[_Relay] = []

    # -- called from relay threads -------------------------------------------------
    def producer_done(self, index: int, relay: _Relay) -> None:
        """Stream from stage ``index`` ended: decide whether its consumer gets EOF."""
        producer = self.procs[index]
        stage = self.stages[index]
        if relay.consumer_gone:
            # The consumer stopped reading: the producer cannot finish its stream.
            self._kill(index, f"stage {index + 2} ({self.stages[index + 1].argv[0]}) "
                              "stopped reading")
        elif relay.refused is not None:
            self._kill(index, f"relay to stage {index + 2} failed: {relay.refused}")
        with contextlib.suppress(OSError):
            os.close(relay.src)
        remaining = max(0.0, self.deadline - time.monotonic())
        try:
            rc = producer.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            rc = None
        # A producer we killed (timeout, stall, ...) did not finish its stream, even
        # if it exited 0 on SIGTERM.
        ok = (rc is not None and _is_ok(stage.codes.classify(rc).outcome)
              and index not in self.killed_because)
        if ok and not relay.consumer_gone and relay.refused is None \
                and stage.eof_gate is not None:
            try:
                relay.refused = stage.eof_gate(relay.tail, relay.bytes)
            except Exception as exc:
                log.exception("end-of-stream gate of stage %d failed", index + 1)
                relay.refused = f"gate error: {exc}"
        if not ok or relay.refused is not None:
            # Never hand the consumer a clean EOF of a failed or refused stream.
            why = f"stage {index + 1} ({stage.argv[0]}) " + (
                "failed" if not ok else f"refused at end of stream: {relay.refused}")
            for j in range(index + 1, len(self.stages)):
                self._kill(j, why)
        consumer = self.procs[index + 1]
        with self.lock:  # ordered against _kill/_kill_all: EOF xor kill-before-EOF
            give = (ok and not relay.consumer_gone and relay.refused is None
                    and index + 1 not in self.killed_because)
            if give:
                relay.eof_given = _alive(consumer)
            else:
                # A consumer we are stopping (e.g. SIGTERMed on timeout) never sees EOF.
                _kill_group(consumer, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.close(relay.dst)

    def _kill(self, index: int, because: str) -> None:
        proc = self.procs[index]
        with self.lock:
            if (_alive(proc) and index not in self.killed_because
                    and not self._stopped_reading(index)):
                self.killed_because[index] = because
            _kill_group(proc, signal.SIGKILL)

    def _stopped_reading(self, index: int) -> bool:
        """Stage ``index`` closed its stdin before its stream ended (its relay got
        EPIPE): it is ending on its own, so killing it now does not make us its cause.
        (A process killed from outside closes its pipes a moment before it can be
        reaped; blaming it on the failure it caused would hide the real cause.)"""
        return 0 < index <= len(self.relays) and self.relays[index - 1].consumer_gone

    def _kill_all(self, because: str) -> None:
        """SIGKILL every stage, consumers first, before any further EOF."""
        with self.lock:
            for i in reversed(range(len(self.procs))):
                proc = self.procs[i]
                if _alive(proc):
                    self.killed_because.setdefault(i, because)
                _kill_group(proc, signal.SIGKILL)

    # -- main ------------------------------------------------------------------------
    def _spawn(self, i: int, st: Stage, n: int) -> subprocess.Popen[bytes]:
        if i == 0:
            if self.input_data is not None:
                stdin: int | None = subprocess.PIPE
            elif self.stdin_fd is not None:
                stdin = self.stdin_fd
            else:
                stdin = subprocess.DEVNULL
        else:
            stdin = subprocess.PIPE
        if i == n - 1:
            stdout: int | None = (self.stdout_fd if self.stdout_fd is not None
                                  else subprocess.PIPE)
        else:
            stdout = subprocess.PIPE
        try:
            return subprocess.Popen(
                # a consumer of our relay dies with us (no clean EOF if we die)
                dies_with_parent(st.argv) if i > 0 else st.argv,
                stdin=stdin,
                stdout=stdout,
                stderr=subprocess.PIPE,
                env=_child_env(st.env, self.env),
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError:
            raise CommandNotFound(
                f"{st.argv[0]}: command not found", argv=REDACTOR.redact_argv(st.argv)
            ) from None

    def execute(self) -> tuple[list[CommandResult], float]:
        started = time.monotonic()
        n = len(self.stages) + (1 if self.factory is not None else 0)
        captures: dict[int, _Capture] = {}
        capture_out: _Capture | None = None
        feeder: threading.Thread | None = None
        try:
            # Spawn order: stage order, or, with a factory, the later stages first
            # (self.procs then holds them in order until the first one is put in front).
            for i in ([*range(1, n), 0] if self.factory is not None else range(n)):
                if i == 0 and self.factory is not None:
                    st = self.factory()
                    if not isinstance(st, Stage):
                        raise TypeError(f"a stage factory returned {type(st).__name__}, "
                                        "not a Stage")
                    self.stages.insert(0, st)
                # (until the first stage is made, stage i sits at index i - 1)
                st = self.stages[i - (n - len(self.stages))]
                proc = self._spawn(i, st, n)
                if i == 0 and self.factory is not None:
                    self.procs.insert(0, proc)
                else:
                    self.procs.append(proc)
                captures[i] = _Capture(proc.stderr, st.on_stderr_line, f"stderr-{i}")
            for i in range(1, n):
                prev, proc = self.procs[i - 1], self.procs[i]
                assert prev.stdout is not None and proc.stdin is not None
                src = os.dup(prev.stdout.fileno())
                prev.stdout.close()
                dst = os.dup(proc.stdin.fileno())
                proc.stdin.close()
                relay = _Relay(i - 1, src, dst, self, gate=self.stages[i - 1].eof_gate,
                               watch=self.stall_timeout is not None)
                self.relays.append(relay)
                relay.start()
            last = self.procs[-1]
            if last.stdout is not None:
                capture_out = _Capture(last.stdout, self.on_stdout_line, "stdout")
            first = self.procs[0]
            if self.input_data is not None and first.stdin is not None:
                feeder = threading.Thread(target=_feed, args=(first.stdin, self.input_data),
                                          daemon=True)
                feeder.start()
            self._wait_all()
            self._reap_lingering([*captures.values(), *([capture_out] if capture_out else [])])
        except BaseException:
            self._kill_all("aborted")
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_GRACE)
            raise
        finally:
            for relay in self.relays:
                relay.join(timeout=KILL_GRACE + 5)
            if feeder is not None:
                feeder.join(timeout=5)
        duration = time.monotonic() - started
        results = []
        stdout_text = capture_out.text() if capture_out else ""
        captures_err = [captures[i] for i in range(n)]
        for i, (st, proc, cap) in enumerate(zip(self.stages, self.procs, captures_err,
                                                strict=True)):
            rc = proc.returncode
            assert rc is not None
            code = st.codes.classify(rc)
            meaning, outcome = code.meaning, code.outcome
            because = self.killed_because.get(i, "")
            refused = self.relays[i].refused if i < len(self.relays) else None
            if because.startswith(("timeout", "stalled")):
                # Killed by a deadline: fails even if it exited 0 on SIGTERM; transient.
                meaning, outcome = f"killed: {because}", "transient"
            elif because and not _is_ok(outcome):
                meaning = f"killed: {because}"
            elif refused is not None and _is_ok(outcome):
                meaning, outcome = f"refused at end of stream: {refused}", "permanent"
            results.append(CommandResult(
                argv=REDACTOR.redact_argv(st.argv),
                returncode=rc,
                stdout=stdout_text if i == n - 1 else "",
                stderr=cap.text(),
                duration=self.exit_times.get(i, time.monotonic()) - started,
                meaning=meaning,
                outcome=outcome,
                truncated=cap.truncated or (i == n - 1 and bool(capture_out
                                                                and capture_out.truncated)),
            ))
        return results, duration

    def _wait_all(self) -> None:
        pending = set(range(len(self.procs)))
        kill_at = float("inf")
        while pending:
            now = time.monotonic()
            if now >= self.deadline and not self.timed_out and not self.stalled:
                self.timed_out = True
                with self.lock:
                    for i in sorted(pending, reverse=True):  # consumers first
                        self.killed_because.setdefault(i, f"timeout after {self.timeout:g}s")
                        _kill_group(self.procs[i], signal.SIGTERM)
                kill_at = now + KILL_GRACE
            if self.timed_out and now >= kill_at:
                for i in pending:
                    _kill_group(self.procs[i], signal.SIGKILL)
            if self.stall_timeout is not None and not self.stalled and not self.timed_out:
                self._check_stall(now)
            for i in list(pending):
                rc = self.procs[i].poll()
                if rc is not None:
                    self.exit_times[i] = time.monotonic()
                    pending.discard(i)
                    if not _is_ok(self.stages[i].codes.classify(rc).outcome):
                        self._fail_others(i)
            if pending:
                time.sleep(0.01)

    def _check_stall(self, now: float) -> None:
        assert self.stall_timeout is not None
        for relay in self.relays:
            since = relay.writing_since
            if since is not None and now - since > self.stall_timeout:
                consumer = self.stages[relay.index + 1].argv[0]
                self.stalled = True
                log.debug("stage %d (%s) accepted no data for %gs: killing the pipeline",
                          relay.index + 2, consumer, self.stall_timeout)
                self._kill_all(f"stalled: stage {relay.index + 2} ({consumer}) accepted "
                               f"no data for {self.stall_timeout:g}s")
                return

    def _reap_lingering(self, captures: list[_Capture]) -> None:
        """Children a command left behind may hold its pipes open; after a short
        grace their process groups are killed so the capture can finish."""
        grace_end = time.monotonic() + LINGER_GRACE
        for cap in captures:
            cap.thread.join(timeout=max(0.0, grace_end - time.monotonic()))
        if any(cap.thread.is_alive() for cap in captures):
            for proc in self.procs:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

    def _fail_others(self, failed: int) -> None:
        """pipefail: one stage failed, so the pipeline cannot succeed; stop the rest."""
        name = self.stages[failed].argv[0]
        for j in range(len(self.procs)):
            if j != failed and _alive(self.procs[j]):
                self._kill(j, f"stage {failed + 1} ({name}) failed")


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()  # type: ignore[attr-defined]


def _check_timeout(timeout: float) -> None:
    if timeout is None or not (timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    codes: ExitCodeTable = GENERIC,
    env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input: bytes | str | None = None,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    on_stdout_line: LineCallback | None = None,
    on_stderr_line: LineCallback | None = None,
    check: bool = True,
) -> CommandResult:
    """Run one command to completion.

    ``env`` is added to the inherited allowlist of this process's environment
    (:func:`inherited_env`; ``base_env`` replaces it).
    With ``check`` (the default) a failing exit code raises :class:`CommandError`
    (:class:`CommandTimeout` on timeout); otherwise the result is returned.
    """
    _check_timeout(timeout)
    check_argv(argv)
    stage = Stage(tuple(argv), codes=codes, env=dict(env or {}), on_stderr_line=on_stderr_line)
    result = pipeline(
        [stage], timeout=timeout, base_env=base_env, cwd=cwd, input=input, stdin_fd=stdin_fd,
        stdout_fd=stdout_fd, on_stdout_line=on_stdout_line, check=False,
    )
    res = result.stages[0]
    if check and res.outcome not in ("ok", "warning"):
        raise _error_for(res, timeout=timeout)
    return res


def _error_for(res: CommandResult, *, timeout: float) -> CommandError:
    if res.meaning.startswith("killed: timeout"):
        return CommandTimeout(
            f"{res.argv[0]} timed out after {timeout:g}s", argv=res.argv, timeout=timeout,
            stderr_tail=res.stderr_tail(),
        )
    return make_error(res)


def pipeline(
    stages: Sequence[Stage | Sequence[str] | StageFactory],
    *,
    timeout: float,
    stall_timeout: float | None = None,
    base_env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input: bytes | str | None = None,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    on_stdout_line: LineCallback | None = None,
    check: bool = True,
) -> PipelineResult:
    """Run stages connected stdout→stdin, with pipefail semantics.

    The first stage may be a :data:`StageFactory`, called after the later stages
    started (its time counts against ``timeout``).

    Succeeds only if every stage's exit code is ok (or a warning) per its table.
    On the first failure every other stage is killed; a consumer never receives
    EOF from a producer that did not exit cleanly, nor from one whose
    :attr:`Stage.eof_gate` refused its stream (that producer's result then reads
    ``refused at end of stream: <why>``, permanent). With ``stall_timeout``, a
    consumer that accepts no data for that many seconds gets every stage killed,
    consumers first (``killed: stalled ...``, transient). Raises
    :class:`PipelineError` (with every failed stage's error) when ``check`` is set.
    """
    _check_timeout(timeout)
    if stall_timeout is not None:
        _check_timeout(stall_timeout)
    if input is not None and stdin_fd is not None:
        raise ValueError("give either input or stdin_fd, not both")
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    factory = stages[0] if callable(stages[0]) and len(stages) > 1 else None
    if any(callable(s) for s in stages[1 if factory else 0:]):
        raise ValueError("only the first stage of a pipeline (of two or more) may be made "
                         "by a factory")
    norm: list[Stage | StageFactory] = [
        s if isinstance(s, Stage) or s is factory else Stage(tuple(s))  # type: ignore[arg-type]
        for s in stages]
    last = norm[-1]
    if isinstance(last, Stage) and last.eof_gate is not None:
        raise ValueError("eof_gate belongs on a producer; the last stage has no consumer")
    data = input.encode() if isinstance(input, str) else input
    shown = " | ".join(" ".join(REDACTOR.redact_argv(s.argv)) if isinstance(s, Stage)
                       else "(made after the others start)" for s in norm)
    log.debug("running: %s (timeout %gs)", shown, timeout)
    runner = _Run(norm, timeout=timeout, stall_timeout=stall_timeout, env=base_env, cwd=cwd,
                  input_data=data, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                  on_stdout_line=on_stdout_line)
    results, duration = runner.execute()
    failed = [i for i, r in enumerate(results) if not _is_ok(r.outcome)]
    cause: int | None = None
    if failed:
        # The cause is the failed stage that was not killed by us, earliest first.
        not_killed = [i for i in failed if i not in runner.killed_because]
        candidates = not_killed or failed
        cause = min(candidates, key=lambda i: runner.exit_times.get(i, float("inf")))
    relays = runner.relays
    out = PipelineResult(
        stages=tuple(results), duration=duration,
        bytes_relayed=tuple(r.bytes for r in relays),
        eof_given=tuple(r.eof_given for r in relays),
        refused=tuple(r.refused for r in relays),
        stalled=runner.stalled, timed_out=runner.timed_out, cause=cause,
    )
    for i in failed:
        log.debug("stage %d %s: exit %s (%s)", i + 1, results[i].argv[0],
                  results[i].returncode, results[i].meaning)
    if check and cause is not None:
        errors = [_error_for(results[i], timeout=timeout) for i in failed]
        first = errors[failed.index(cause)]
        if len(norm) == 1:
            raise first
        raise PipelineError(
            f"pipeline failed at stage {cause + 1} ({norm[cause].argv[0]}): {first}",
            failures=errors, first=first,
        )
    return out
