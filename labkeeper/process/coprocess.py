"""A long-lived child talking over pipes (a ``psql`` session), under the runner's
rules: argv tuple, inherited-env allowlist, own process group, redacted stderr."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from labkeeper.errors import CommandNotFound
from labkeeper.process.capture import Capture
from labkeeper.process.children import (
    StdinGuard,
    dies_with_parent,
    kill_group,
    niced,
    renice_threads,
    set_session_priority,
)
from labkeeper.process.codes import GENERIC, ExitCodeTable
from labkeeper.process.env import child_env
from labkeeper.process.result import CommandResult
from labkeeper.process.stage import LineCallback, check_argv
from labkeeper.secrets import REDACTOR


class Coprocess:
    """A long-lived child talking over pipes (e.g. a ``psql`` session), under the
    runner's rules: an argv tuple (no shell), ``env`` added to the inherited
    allowlist (:func:`inherited_env`; ``base_env`` replaces it), its own process
    group (:meth:`kill` SIGKILLs the group), stderr read in a thread (capped, redacted).

    ``nice`` > 0 runs it at that niceness, and its session (its own autogroup) too, so
    it takes only CPU that other work leaves idle.

    ``guard_stdin``: a child for which end-of-stream means "store it" (restic) gets a
    :class:`StdinGuard`, so our own death never reaches it as one; :meth:`end_stdin`
    hands out the real end-of-stream.

    :attr:`stdin` and :attr:`stdout` are the raw binary pipes; the caller owns the
    protocol spoken over them and its deadlines. Use :func:`run`/:func:`pipeline`
    for anything that runs to completion.
    """

    def __init__(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 base_env: Mapping[str, str] | None = None, cwd: str | None = None,
                 on_stderr_line: LineCallback | None = None, nice: int = 0,
                 guard_stdin: bool = False) -> None:
        check_argv(argv)
        self.argv = tuple(argv)
        self.started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                niced(dies_with_parent(self.argv), nice), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(env, base_env),
                cwd=cwd, start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise CommandNotFound(f"{self.argv[0]}: command not found",
                                  argv=REDACTOR.redact_argv(self.argv)) from None
        assert self._proc.stdin is not None
        self._guard = StdinGuard(self._proc.stdin.fileno()) if guard_stdin else None
        if nice > 0:
            set_session_priority(self._proc.pid, nice)
        self._stderr = Capture(self._proc.stderr, on_stderr_line, f"{self.argv[0]}-stderr")

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

    def full_priority(self) -> None:
        """Back to normal priority (a niced child whose work is now on the critical
        path): its session's group always; its threads where permitted (root)."""
        set_session_priority(self._proc.pid, 0)
        renice_threads(self._proc.pid, 0)

    def kill(self) -> None:
        """SIGKILL the child's process group (a no-op once it exited)."""
        kill_group(self._proc, signal.SIGKILL)
        self._release_guard()

    def end_stdin(self) -> None:
        """The end-of-stream: its stdin closed (the guard let go of it first)."""
        self._release_guard()
        with contextlib.suppress(OSError, ValueError):
            assert self._proc.stdin is not None
            self._proc.stdin.close()

    def _release_guard(self) -> None:
        if self._guard is not None:
            self._guard.release()

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
            self.end_stdin()
            if self.wait(timeout) is None:
                kill = True
        if kill:
            self.kill()
        rc = proc.wait()
        self._release_guard()
        for stream in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError, AttributeError, ValueError):
                stream.close()  # type: ignore[union-attr]
        self._stderr.thread.join(timeout=5)
        return rc
