"""A pipeline's consumer started before its pipeline (:class:`EarlyStart`): its start-up
(restic's key derivation and index load, ≈0.7 s) overlaps whatever runs before the
pipeline does, and :func:`labkeeper.process.pipeline` takes it over as that stage.

End-of-stream stays ours: the child's stdin is never closed while it lives. One that
no pipeline takes is stopped with ``stop_signal`` (SIGINT: restic stores nothing), then
SIGKILLed after ``stop_grace``, and ``after_stop`` runs (restic 0.14 stopped while it
checks the locks right after writing its own exits without removing it: the caller
removes it); so is one left waiting past ``expires``, and every one still waiting when
this process exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable

from labkeeper.errors import CommandNotFound
from labkeeper.process.children import StdinGuard, alive, dies_with_parent, kill_group
from labkeeper.process.env import child_env
from labkeeper.process.stage import Stage
from labkeeper.secrets import REDACTOR

log = logging.getLogger("labkeeper.process")

STOP_GRACE = 10.0
"""Seconds a stopped early child has to exit after ``stop_signal`` (restic removes its
lock: one request to the repository) before it is SIGKILLed."""

_waiting: set[EarlyStart] = set()
"""Every early child not yet taken or stopped (also keeps each reachable: a collected
``Popen`` would close the child's stdin, a clean end-of-stream)."""
_waiting_lock = threading.Lock()


class EarlyStart:
    """``stage`` (a pipeline consumer: stdin, stdout and stderr are pipes) started now,
    for a pipeline to take over (:meth:`take`) within ``expires`` seconds.

    Started exactly as the pipeline would start it: ``stage.env`` on the inherited
    allowlist, its own session, SIGKILLed if this process dies.
    """

    def __init__(self, stage: Stage, *, expires: float, stop_signal: int = signal.SIGINT,
                 stop_grace: float = STOP_GRACE,
                 after_stop: Callable[[], None] | None = None) -> None:
        if not expires > 0:
            raise ValueError(f"expires must be a positive number of seconds, got {expires!r}")
        self.stage = stage
        self.stop_signal = stop_signal
        self.stop_grace = stop_grace
        self.after_stop = after_stop
        """Called once this stopped a child that was still running (restic: remove the
        lock it may have left); what it raises is logged, not raised."""
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._state = "waiting"  # -> "taken" | "stopped"
        try:
            self._proc: subprocess.Popen[bytes] = subprocess.Popen(
                dies_with_parent(stage.argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, env=child_env(stage.env, None),
                start_new_session=True, close_fds=True)
        except FileNotFoundError:
            raise CommandNotFound(f"{stage.argv[0]}: command not found",
                                  argv=REDACTOR.redact_argv(stage.argv)) from None
        assert self._proc.stdin is not None
        self.guard: StdinGuard | None = StdinGuard(self._proc.stdin.fileno())
        """Held on the child's stdin from the start (same thread); the pipeline that
        takes the child takes it too (:mod:`.engine`), else :meth:`stop` releases it."""
        with _waiting_lock:
            _waiting.add(self)
        self._timer = threading.Timer(expires, self.stop, kwargs={"why": "not taken in time"})
        self._timer.daemon = True
        self._timer.start()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def waiting(self) -> bool:
        """Neither taken nor stopped yet."""
        return self._state == "waiting"

    def take(self, stage: Stage) -> subprocess.Popen[bytes] | None:
        """The running child, handed over once, if it was started as ``stage``
        (same argv and environment) and is still waiting; else None (and a child
        started differently is stopped: no pipeline can use it)."""
        with self._lock:
            if self._state != "waiting":
                return None
            if stage.argv != self.stage.argv or dict(stage.env) != dict(self.stage.env):
                mismatch = True
            else:
                mismatch = False
                self._state = "taken"
        if mismatch:
            self.stop(why="started for another command")
            return None
        self._forget()
        log.debug("%s: taken over %.2f s after its early start", self.stage.argv[0],
                  time.monotonic() - self.started)
        return self._proc

    def stop(self, why: str = "not needed") -> int | None:
        """Stop the child if nobody took it: ``stop_signal``, then SIGKILL after
        ``stop_grace``. Its stdin is closed only once it has exited. Returns its exit
        code (None if it was taken)."""
        with self._lock:
            if self._state == "taken":
                return None
            first = self._state == "waiting"
            self._state = "stopped"
        running = first and alive(self._proc)
        if first:
            self._forget()
            log.debug("%s (early start): stopping it, %s", self.stage.argv[0], why)
            kill_group(self._proc, self.stop_signal)
        try:
            rc = self._proc.wait(timeout=self.stop_grace)
        except subprocess.TimeoutExpired:
            log.warning("%s (early start) did not exit %g s after being stopped; killed",
                        self.stage.argv[0], self.stop_grace)
            kill_group(self._proc, signal.SIGKILL)
            rc = self._proc.wait()
        if self.guard is not None:
            self.guard.release()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            with contextlib.suppress(OSError, AttributeError, ValueError):
                stream.close()  # type: ignore[union-attr]
        if running and self.after_stop is not None:
            try:
                self.after_stop()
            except Exception as exc:  # a clean-up that failed is said, not raised
                log.warning("%s (early start): clean-up after stopping it failed: %s",
                            self.stage.argv[0], exc)
        return rc

    def _forget(self) -> None:
        self._timer.cancel()
        with _waiting_lock:
            _waiting.discard(self)


def stop_all(why: str = "this process is ending") -> None:
    """Stop every early child still waiting (registered to run at normal exit)."""
    with _waiting_lock:
        left = list(_waiting)
    for early in left:
        early.stop(why=why)


atexit.register(stop_all)
