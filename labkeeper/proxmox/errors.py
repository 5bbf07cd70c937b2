"""Errors of the Proxmox adapter: a guest lock, a failed task, a task still running.

Each says whether a retry can help (``transient``); :func:`lock_name` reads the lock
PVE names in ``CT is locked (backup)`` so a lock is told apart from other refusals.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from labkeeper.errors import LabkeeperError, ServiceError, TaskTimeout


class GuestLocked(ServiceError):
    """PVE refused a call because the guest holds a lock (``CT is locked (backup)``).

    Transient: the lock goes away when the backup/snapshot/rollback finishes.
    """

    def __init__(self, message: str, *, lock: str, status: int | None = None) -> None:
        super().__init__(message, service="proxmox", status=status, transient=True)
        self.lock = lock


class ProxmoxTaskError(LabkeeperError):
    """A PVE task ended with an error ``exitstatus`` (``job errors``, ...).

    Carries the UPID, the exit status and the tail of the task log (redacted).
    Transient only when the failure was a lock held by someone else.
    """

    def __init__(self, message: str, *, upid: str, exitstatus: str, log_tail: Sequence[str],
                 transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = tuple(log_tail)


class ProxmoxTaskTimeout(TaskTimeout):
    """Waiting on a PVE task ran out of time; the task may still be running."""

    def __init__(self, message: str, *, upid: str, timeout: float) -> None:
        super().__init__(message)
        self.upid = upid
        self.timeout = timeout


_LOCK_RE = re.compile(r"\b(?:CT|VM) is locked \(([^)\s]+)\)")


def lock_name(text: str) -> str | None:
    """The lock named in PVE's ``CT is locked (backup)`` / ``VM is locked (...)``."""
    match = _LOCK_RE.search(text or "")
    return match.group(1) if match else None
