"""Child-process primitives: dying with this process (and a guard on a consumer's
stdin for the moment we die), liveness without reaping, killing a whole process group,
lowering a child's CPU priority."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence

from labkeeper.errors import CommandNotFound
from labkeeper.secrets import REDACTOR

KILL_GRACE = 3.0  # seconds between SIGTERM and SIGKILL on timeout

_SETPRIV = shutil.which("setpriv")
_NICE = shutil.which("nice")
_SLEEP = shutil.which("sleep")


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


class StdinGuard:
    """A second holder of a consumer's stdin: the write end ``fd`` of its pipe, kept
    open by a tiny child (``sleep``) that, like the consumer, is SIGKILLed when the
    thread that started both dies (create it from that thread).

    Why: when this process is killed, the kernel closes its descriptors *before* it
    signals its children. In that moment a consumer could read a clean end-of-stream
    and, like restic, store what it got (seen in a loaded CI run: the consumer won the
    race against its ``--pdeathsig``). With the guard holding the pipe, the stream ends
    only when the guard dies of the same exit as the consumer, and the kernel queues
    both signals together: the consumer is dead by then.

    :meth:`release` (SIGKILL, reaped) must come before any end-of-stream we hand out,
    and after a consumer we stop is killed. No guard where setpriv is missing: nothing
    would end it with us."""

    def __init__(self, fd: int) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        if _SETPRIV is None or _SLEEP is None:
            return
        self._proc = subprocess.Popen(
            (_SETPRIV, "--pdeathsig", "KILL", "--", _SLEEP, "infinity"),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(fd,), start_new_session=True, close_fds=True)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def release(self) -> None:
        """Let go of the stream: the guard is killed and reaped (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()


def alive(proc: subprocess.Popen[bytes]) -> bool:
    """Whether ``proc`` has not exited yet, without reaping it. (``Popen.poll`` answers
    None while another thread holds its wait lock, which would make us count a child
    that died on its own as one we killed.)"""
    if proc.returncode is not None:
        return False
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
    except ChildProcessError:  # reaped meanwhile by another thread
        return False


def kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def niced(argv: Sequence[str], nice: int) -> tuple[str, ...]:
    """``argv`` started through ``nice -n <nice>`` (every thread of it, from its
    start); unchanged when ``nice`` is 0 or the tool is missing."""
    if nice <= 0 or _NICE is None:
        return tuple(argv)
    return (_NICE, "-n", str(nice), *argv)


def set_session_priority(pid: int, nice: int) -> bool:
    """Give the autogroup of ``pid`` (a child that started its own session) the
    niceness ``nice`` (any value down to this process's own). With the kernel's
    autogroup scheduling (on by default in Debian and Proxmox kernels) every session is
    its own group, CPU is shared between the groups first, and a process's own niceness
    counts only inside its group: a niced child alone in its session would still take a
    full share. False where the kernel has no autogroup or refuses."""
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        return False
    return True


def renice_threads(pid: int, nice: int) -> None:
    """Every thread of ``pid`` at niceness ``nice``, where permitted (lowering it takes
    CAP_SYS_NICE: as root; otherwise the threads keep theirs)."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return
    for tid in tids:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, nice)
