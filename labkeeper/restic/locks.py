"""restic's repository locks: which are stale, removing those, waiting for live ones.

A lock is stale when its process is gone (knowable only on the host that took it)
or it is older than the repository's ``stale_lock_minutes``. Stale locks are removed
with ``restic unlock``, which removes a dead process's lock only when it runs on the
host that took it: :class:`LockSite` says where that is (this machine, or a backup
host over SSH, :func:`labkeeper.path_backup.handle_locks`).

A lock file that vanishes between restic's listing and its load is one released
meanwhile (how each restic version behaves then: ``benchmarks/README.md``).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from labkeeper.errors import CommandError, TransientError
from labkeeper.restic.argv import cat_lock_argv, list_locks_argv, unlock_argv
from labkeeper.restic.commands import run_restic
from labkeeper.restic.models import LockInfo, parse_lock
from labkeeper.restic.repository import Repo

logger = logging.getLogger(__name__)


def lock_is_stale(lock: LockInfo, *, now: datetime, this_host: str, stale_after: float,
                  pid_alive: Callable[[int], bool]) -> tuple[bool, str]:
    """Is a lock left by a dead run? ``(stale, why)``.

    Stale when its process is gone (only knowable for locks taken on this host),
    or when it is older than ``stale_after`` seconds (any host; restic refreshes a
    live lock every 5 minutes, so a live one never gets that old).
    """
    age = (now - lock.time).total_seconds()
    if lock.hostname == this_host and lock.pid and not pid_alive(lock.pid):
        return True, f"its process {lock.pid} on {lock.hostname} is gone"
    if age > stale_after:
        return True, f"it is {age / 60:.0f} min old (threshold {stale_after / 60:.0f} min)"
    return False, f"held by pid {lock.pid} on {lock.hostname}, {age:.0f} s old"


def describe_lock(lock: LockInfo) -> str:
    kind = "exclusive" if lock.exclusive else "shared"
    return (f"{kind} lock {lock.id[:8]} of {lock.username or '?'}@{lock.hostname} pid "
            f"{lock.pid} since {lock.time.isoformat(timespec='seconds')}")



def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this machine (zombies count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


CAT_LOCK_TIMEOUT = 15.0
"""restic 0.14 retries loading a missing file for about a minute: a lock released
between ``list locks`` and ``cat lock`` would cost that long; such a lock is gone."""


def list_locks(repo: Repo, *, timeout: float = 60) -> list[LockInfo]:
    res = run_restic(repo, list_locks_argv(repo), timeout=timeout)
    out = []
    for lock_id in (line.strip() for line in res.stdout.splitlines()):
        if not re.fullmatch(r"[0-9a-f]{64}", lock_id):
            continue
        try:
            cat = run_restic(repo, cat_lock_argv(repo, lock_id),
                             timeout=min(timeout, CAT_LOCK_TIMEOUT))
        except CommandError:
            continue  # released between list and cat (or restic kept retrying to load it)
        out.append(parse_lock(lock_id, cat.stdout))
    return out


def unlock(repo: Repo, *, timeout: float = 60) -> None:
    run_restic(repo, unlock_argv(repo), timeout=timeout)


def note_blocking(blocking: Sequence[tuple[LockInfo, str]], *, deadline: float, wait: float,
                  waited: set[str], notes: list[str]) -> None:
    """One round of waiting on live conflicting locks: past ``deadline`` a transient
    error naming them; otherwise each lock not yet waited on noted (and logged) once."""
    if time.monotonic() >= deadline:
        held = "; ".join(f"{describe_lock(lk)} ({why})" for lk, why in blocking)
        raise TransientError(f"repository still locked after waiting {wait:.0f} s: {held}")
    for lock, why in blocking:
        if lock.id not in waited:
            waited.add(lock.id)
            note = f"waiting for {describe_lock(lock)} ({why})"
            notes.append(note)
            logger.info("%s", note)


@dataclass(frozen=True)
class LockSite:
    """Where stale locks are judged and removed: the host name restic records in the
    locks it takes there, whether a process lives there, ``restic unlock`` run there."""

    host: str
    pid_alive: Callable[[int], bool]
    unlock: Callable[[], None]
    where: str = ""
    """Said after `restic unlock` in the notes (`` on nas``); empty for this machine."""
    not_removed_hint: str = ""
    """Said when a stale lock survived `restic unlock`."""


def local_site(repo: Repo, *, timeout: float = 60) -> LockSite:
    """This machine: its host name, its processes, its restic."""
    return LockSite(socket.gethostname(), pid_alive, lambda: unlock(repo, timeout=timeout),
                    not_removed_hint=" (restic treats foreign locks as stale only after "
                    "30 min)")


def remove_stale(repo: Repo, site: LockSite, *, stale_after: float, notes: list[str],
                 timeout: float = 60) -> list[tuple[LockInfo, str]]:
    """One look at the locks: the stale ones removed at ``site`` (each said in
    ``notes`` and logged); returns the live ones, with why each is live (a stale one
    ``restic unlock`` did not remove counts as live)."""
    locks = list_locks(repo, timeout=timeout)
    now = datetime.now(tz=UTC)
    stale: list[tuple[LockInfo, str]] = []
    live: list[tuple[LockInfo, str]] = []
    for lock in locks:
        is_stale, why = lock_is_stale(lock, now=now, this_host=site.host,
                                      stale_after=stale_after, pid_alive=site.pid_alive)
        (stale if is_stale else live).append((lock, why))
    if not stale:
        return live
    site.unlock()
    remaining = {lk.id for lk in list_locks(repo, timeout=timeout)}
    for lock, why in stale:
        if lock.id in remaining:
            note = (f"stale {describe_lock(lock)} ({why}) could not be removed by `restic "
                    f"unlock`{site.where}{site.not_removed_hint}")
            live.append((lock, why))
        else:
            note = f"removed stale {describe_lock(lock)} with `restic unlock`{site.where}: {why}"
        notes.append(note)
        logger.info("%s", note)
    return live


def settle_locks(repo: Repo, site: LockSite, *, exclusive: bool, wait: float,
                 stale_after: float, timeout: float = 60,
                 sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Get the repository ready for a command that needs a shared (``exclusive=False``)
    or an exclusive lock: stale locks removed at ``site``, live conflicting ones waited
    on with exponential backoff (1 s doubling to 30 s) up to ``wait`` seconds, then a
    transient error. Returns what was done, one line each (also logged)."""
    notes: list[str] = []
    deadline = time.monotonic() + wait
    delay = 1.0
    waited_for: set[str] = set()
    while True:
        live = remove_stale(repo, site, stale_after=stale_after, notes=notes,
                            timeout=timeout)
        blocking = [(lk, why) for lk, why in live if exclusive or lk.exclusive]
        if not blocking:
            return notes
        note_blocking(blocking, deadline=deadline, wait=wait, waited=waited_for, notes=notes)
        sleep(min(delay, max(0.1, deadline - time.monotonic())))
        delay = min(delay * 2, 30.0)


def wait_for_locks(repo: Repo, *, exclusive: bool, wait: float, stale_after: float,
                   timeout: float = 60, sleep: Callable[[float], None] | None = None) -> list[str]:
    """:func:`settle_locks` on this machine (dead processes on this host, or locks
    older than ``stale_after`` s, are stale)."""
    return settle_locks(repo, local_site(repo, timeout=timeout), exclusive=exclusive,
                        wait=wait, stale_after=stale_after, timeout=timeout,
                        sleep=sleep or time.sleep)
