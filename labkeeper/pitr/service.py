"""`labkeeper serve` runs `labkeeper wal receive` for each PITR server as a supervised child.

Each child is the receiver service itself (it supervises ``pg_receivewal``); serve
restarts a child that exits (backoff 1..60 s, reset after a minute of running) and,
when serve stops, ends each one by its PID: SIGTERM (the receiver stops
``pg_receivewal`` cleanly), then SIGKILL of its process group after ``stop_timeout``.
The children die with serve if serve itself is killed (``setpriv --pdeathsig``).
The full environment is inherited: the inventory's ``env:`` secret references must
resolve in the child as they do in serve.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from labkeeper import log_setup
from labkeeper.errors import LabkeeperError
from labkeeper.process import check_argv, dies_with_parent

logger = logging.getLogger(__name__)


def receiver_argv(server: str, lab: Path, python: str = sys.executable) -> tuple[str, ...]:
    """``labkeeper wal receive SERVER --lab LAB`` in this interpreter (pure)."""
    return (python, "-m", "cli.main", "wal", "receive", server, "--lab", str(lab))


def next_backoff(previous: float, ran_s: float, *, max_backoff: float = 60.0) -> float:
    """Seconds before restarting a child that ran ``ran_s`` (pure): 1 after a long run
    (over a minute), else double the last wait, at most ``max_backoff``."""
    if ran_s > 60.0:
        return 1.0
    return min(max_backoff, max(1.0, previous * 2))


@dataclass
class _Child:
    name: str
    argv: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    next_start: float = 0.0
    backoff: float = 0.5
    restarts: int = 0
    pids: list[int] = field(default_factory=list)


class ReceiverChildren:
    """Supervise one child per argv (``name -> argv``) from one thread, which also
    spawns them (``pdeathsig`` follows the spawning thread: it lives until :meth:`stop`)."""

    def __init__(self, argvs: Mapping[str, Sequence[str]], *, max_backoff: float = 60.0,
                 stop_timeout: float = 30.0) -> None:
        self.children = {n: _Child(n, tuple(a)) for n, a in argvs.items()}
        for c in self.children.values():
            check_argv(c.argv)
        self.max_backoff, self.stop_timeout = max_backoff, stop_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=log_setup.in_context(self._run),
                                        name="wal-receivers", daemon=True)

    def start(self) -> ReceiverChildren:
        self._thread.start()
        return self

    def pid(self, name: str) -> int | None:
        proc = self.children[name].proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.stop_timeout + 30)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                for child in self.children.values():
                    self._tend(child, time.monotonic())
                self._stop.wait(0.2)
        finally:
            for child in self.children.values():
                self._end(child)

    def _tend(self, child: _Child, now: float) -> None:
        if child.proc is None:
            if now >= child.next_start:
                self._spawn(child, now)
            return
        rc = child.proc.poll()
        if rc is None:
            return
        child.backoff = next_backoff(child.backoff, now - child.started,
                                     max_backoff=self.max_backoff)
        child.next_start, child.proc = now + child.backoff, None
        child.restarts += 1
        logger.info("wal receive %s (pid %s) exited with %s; restarting in %.0f s",
                    child.name, child.pids[-1], rc, child.backoff)

    def _spawn(self, child: _Child, now: float) -> None:
        try:
            child.proc = subprocess.Popen(
                dies_with_parent(child.argv), stdin=subprocess.DEVNULL,
                start_new_session=True, close_fds=True)
        except (OSError, LabkeeperError) as exc:
            child.backoff = next_backoff(child.backoff, 0.0, max_backoff=self.max_backoff)
            child.next_start = now + child.backoff
            logger.info("wal receive %s could not start: %s; retrying in %.0f s", child.name,
                        exc, child.backoff)
            return
        child.started = now
        child.pids.append(child.proc.pid)
        logger.info("wal receive %s started (pid %s)", child.name, child.proc.pid)

    def _end(self, child: _Child) -> None:
        """SIGTERM by PID, wait, then SIGKILL its process group."""
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        logger.info("wal receive %s (pid %s) stopped: %s", child.name, proc.pid,
                    proc.returncode)
