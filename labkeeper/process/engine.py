"""Running a pipeline's stages: spawn, relay, deadline, stall timeout, pipefail, results.

End-of-stream belongs to us: a consumer's stdin is closed only after its producer
exited cleanly (and its end-of-stream gate, if any, accepted the stream); if a
producer fails, every later stage is SIGKILLed before its stdin is closed. If this
process is killed, each consumer dies with it (``--pdeathsig``), and a guard holding its
stdin (:class:`~labkeeper.process.children.StdinGuard`) keeps the kernel's closing of
our descriptors from reaching it as an end-of-stream first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from labkeeper.errors import CommandNotFound
from labkeeper.process.capture import Capture
from labkeeper.process.children import (
    KILL_GRACE,
    StdinGuard,
    alive,
    dies_with_parent,
    kill_group,
)
from labkeeper.process.codes import Outcome, is_ok
from labkeeper.process.env import child_env
from labkeeper.process.relay import Relay
from labkeeper.process.result import CommandResult
from labkeeper.process.stage import LineCallback, Stage, StageFactory
from labkeeper.secrets import REDACTOR

log = logging.getLogger("labkeeper.process")

LINGER_GRACE = 2.0  # seconds a finished command's leftover children may hold its pipes


class PipelineRun:
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
        self.relays: list[Relay] = []
        self.guards: dict[int, StdinGuard] = {}
        """Per consumer (stage index), the guard on its stdin; released before its EOF."""
        self.captures: dict[int, Capture] = {}
        self.capture_out: Capture | None = None
        self.feeder: threading.Thread | None = None

    # -- called from relay threads -------------------------------------------------
    def producer_done(self, index: int, relay: Relay) -> None:
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
        ok = (rc is not None and is_ok(stage.codes.classify(rc).outcome)
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
                relay.eof_given = alive(consumer)
            else:
                # A consumer we are stopping (e.g. SIGTERMed on timeout) never sees EOF.
                kill_group(consumer, signal.SIGKILL)
            self._release_guard(index + 1)
            with contextlib.suppress(OSError):
                os.close(relay.dst)

    def _release_guard(self, index: int) -> None:
        guard = self.guards.pop(index, None)
        if guard is not None:
            guard.release()

    def _kill(self, index: int, because: str) -> None:
        proc = self.procs[index]
        with self.lock:
            if (alive(proc) and index not in self.killed_because
                    and not self._stopped_reading(index)):
                self.killed_because[index] = because
            kill_group(proc, signal.SIGKILL)

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
                if alive(proc):
                    self.killed_because.setdefault(i, because)
                kill_group(proc, signal.SIGKILL)

    # -- main ------------------------------------------------------------------------
    def _spawn(self, i: int, st: Stage, n: int) -> subprocess.Popen[bytes]:
        if st.early is not None:
            # Started ahead exactly as a consumer piping its stdout to us is started.
            fits = i > 0 and self.env is None and self.cwd is None and (
                i < n - 1 or self.stdout_fd is None)
            proc = st.early.take(st) if fits else None
            if proc is not None:
                if st.early.guard is not None:  # started with it, by the same thread
                    self.guards[i] = st.early.guard
                return proc
            st.early.stop(why="its pipeline starts it itself")
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
                env=child_env(st.env, self.env),
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
        try:
            self._spawn_all(n)
            self._connect_relays(n)
            self._start_io()
            self._wait_all()
            out = [self.capture_out] if self.capture_out else []
            self._reap_lingering([*self.captures.values(), *out])
        except BaseException:
            self._kill_all("aborted")
            for proc in self.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=KILL_GRACE)
            raise
        finally:
            for relay in self.relays:
                relay.join(timeout=KILL_GRACE + 5)
            for i in list(self.guards):  # consumers are dead or have had their EOF
                self._release_guard(i)
            if self.feeder is not None:
                self.feeder.join(timeout=5)
        duration = time.monotonic() - started
        return self._results(n, started), duration

    def _spawn_all(self, n: int) -> None:
        """Start every stage, each with its stderr captured. Spawn order: stage order,
        or, with a factory, the later stages first (self.procs then holds them in order
        until the first one is put in front)."""
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
            self.captures[i] = Capture(proc.stderr, st.on_stderr_line, f"stderr-{i}")

    def _connect_relays(self, n: int) -> None:
        """Take over each producer's stdout and consumer's stdin; start their relays."""
        for i in range(1, n):
            prev, proc = self.procs[i - 1], self.procs[i]
            assert prev.stdout is not None and proc.stdin is not None
            src = os.dup(prev.stdout.fileno())
            prev.stdout.close()
            dst = os.dup(proc.stdin.fileno())
            proc.stdin.close()
            if i not in self.guards:  # this thread started the consumer: it starts the guard
                self.guards[i] = StdinGuard(dst)
            relay = Relay(i - 1, src, dst, self, gate=self.stages[i - 1].eof_gate,
                          watch=self.stall_timeout is not None)
            self.relays.append(relay)
            relay.start()

    def _start_io(self) -> None:
        """Capture the last stage's stdout; feed ``input`` to the first stage."""
        last = self.procs[-1]
        if last.stdout is not None:
            self.capture_out = Capture(last.stdout, self.on_stdout_line, "stdout")
        first = self.procs[0]
        if self.input_data is not None and first.stdin is not None:
            self.feeder = threading.Thread(target=_feed, args=(first.stdin, self.input_data),
                                           daemon=True)
            self.feeder.start()

    def _results(self, n: int, started: float) -> list[CommandResult]:
        results = []
        capture_out = self.capture_out
        stdout_text = capture_out.text() if capture_out else ""
        captures_err = [self.captures[i] for i in range(n)]
        for i, (st, proc, cap) in enumerate(zip(self.stages, self.procs, captures_err,
                                                strict=True)):
            rc = proc.returncode
            assert rc is not None
            meaning, outcome = self._judge(i, st, rc)
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
        return results

    def _judge(self, i: int, st: Stage, rc: int) -> tuple[str, Outcome]:
        """Stage ``i``'s meaning and outcome: its exit code, unless we killed it or
        its relay refused its stream."""
        code = st.codes.classify(rc)
        meaning, outcome = code.meaning, code.outcome
        because = self.killed_because.get(i, "")
        refused = self.relays[i].refused if i < len(self.relays) else None
        if because.startswith(("timeout", "stalled")):
            # Killed by a deadline: fails even if it exited 0 on SIGTERM; transient.
            meaning, outcome = f"killed: {because}", "transient"
        elif because and not is_ok(outcome):
            meaning = f"killed: {because}"
        elif refused is not None and is_ok(outcome):
            meaning, outcome = f"refused at end of stream: {refused}", "permanent"
        return meaning, outcome

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
                        kill_group(self.procs[i], signal.SIGTERM)
                kill_at = now + KILL_GRACE
            if self.timed_out and now >= kill_at:
                for i in pending:
                    kill_group(self.procs[i], signal.SIGKILL)
            if self.stall_timeout is not None and not self.stalled and not self.timed_out:
                self._check_stall(now)
            for i in list(pending):
                rc = self.procs[i].poll()
                if rc is not None:
                    self.exit_times[i] = time.monotonic()
                    pending.discard(i)
                    if not is_ok(self.stages[i].codes.classify(rc).outcome):
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

    def _reap_lingering(self, captures: list[Capture]) -> None:
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
            if j != failed and alive(self.procs[j]):
                self._kill(j, f"stage {failed + 1} ({name}) failed")


def _feed(pipe: object, data: bytes) -> None:
    try:
        pipe.write(data)  # type: ignore[attr-defined]
    except (BrokenPipeError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError):
            pipe.close()  # type: ignore[attr-defined]
