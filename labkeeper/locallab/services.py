"""Long-running local services (a server we start and later stop by its PID).

The one-shot runner (:mod:`labkeeper.process`) is for commands that finish;
servers that must keep running while tests or the demo use them are started
here, in their own process group, and stopped by PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path


class Service:
    """A child server process with its log file."""

    def __init__(self, name: str, argv: Sequence[str], *, log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 stop_signal: int = signal.SIGTERM) -> None:
        self.name = name
        self.stop_signal = stop_signal
        self.argv = tuple(argv)
        self.log_path = log_path
        self.env = dict(env or {})
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}; last log lines:\n"
                + log_tail(self.log_path)
            )

    def stop(self, *, grace: float = 5.0) -> None:
        if self.proc is None:
            return
        stop_pid(self.proc.pid, grace=grace, proc=self.proc, first_signal=self.stop_signal)
        self.proc = None


def stop_pid(pid: int, *, grace: float = 5.0, proc: subprocess.Popen[bytes] | None = None,
             group: bool = True, first_signal: int = signal.SIGTERM) -> None:
    """Stop a process (and its group) by PID: ``first_signal``, wait, then SIGKILL."""

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    def gone() -> bool:
        if proc is not None:
            return proc.poll() is not None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return is_zombie(pid)

    send(first_signal)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if gone():
            return
        time.sleep(0.05)
    send(signal.SIGKILL)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def is_zombie(pid: int) -> bool:
    """True when the process is a zombie (or already gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_interrupt() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM arrives."""
    import signal as _signal

    stop = {"now": False}

    def handler(signum: int, frame: object) -> None:
        stop["now"] = True

    _signal.signal(_signal.SIGINT, handler)
    _signal.signal(_signal.SIGTERM, handler)
    while not stop["now"]:
        time.sleep(0.2)
