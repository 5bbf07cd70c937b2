"""Nothing of a failed path-set attempt survives: after the failure, on a fresh SSH
connection, any restic of it still running on the host is stopped, ``restic unlock``
runs there and every snapshot carrying its ``backup:<id>`` tag is forgotten
(:func:`discard_attempt`). What could not be done is recorded as pending
(:class:`PendingCleanups`, ``<state_dir>/path_backup/pending-<host>.<set>.json``) and
swept before the next backup of the set (:func:`sweep_pending`): if it cannot be
made sure that no restic of the attempt still runs, the new backup is not started;
if only the repository part fails, the backup goes on with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from labkeeper import pending as pending_mod
from labkeeper import restic
from labkeeper.errors import LabkeeperError
from labkeeper.path_backup.remote import STOP_GRACE, Remote, stop_attempt
from labkeeper.path_backup.results import PathBackupFailed, backup_tag, series_label
from labkeeper.pending import PendingAttempt
from labkeeper.ssh import SshClient, SshTarget, connect

logger = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 90.0

# -- where pending cleanups are (labkeeper.pending, shared with pg_backup) -------------

PENDING_DIR = "path_backup"


def pending_owner(host: str, name: str) -> pending_mod.Owner:
    return pending_mod.Owner(PENDING_DIR, (("host", host, "host"), ("path_set", name, "path set")),
                             series_label(host, name))


def pending_path(state_dir: Path, host: str, name: str) -> Path:
    """``<state_dir>/path_backup/pending-<host>.<set>.json``: neither an inventory host
    nor a set name can hold a ``.`` (or a ``/``), so the file is one path set's alone."""
    return pending_mod.pending_path(state_dir, pending_owner(host, name))


def dump_pending(host: str, name: str, attempts: Sequence[PendingAttempt]) -> str:
    return pending_mod.dump_pending(pending_owner(host, name), attempts)


def load_pending(text: str, *, host: str, name: str) -> list[PendingAttempt]:
    """The attempts in a pending file of ``host``/``name``; ValueError when the text is
    not such a file (any other JSON, another set's, an id restic could not match)."""
    return pending_mod.load_pending(text, pending_owner(host, name))



class PendingCleanups(pending_mod.PendingStore):
    """The pending-cleanup file of one path set (see :func:`pending_path` and
    :class:`labkeeper.pending.PendingStore`)."""

    def __init__(self, state_dir: Path, host: str, name: str) -> None:
        super().__init__(state_dir, pending_owner(host, name))
        self.host = host
        self.name = name



def _stop_and_unlock(target: SshTarget, repo: restic.Repo, *, binary: str,
                     env: dict[str, str], sudo: bool | str, tag: str,
                     connector: Callable[[SshTarget], SshClient], grace: float
                     ) -> tuple[list[str], str | None]:
    """On a fresh connection: no process of the attempt left, ``restic unlock`` run on
    the host. Returns (what was done, the problem or None)."""
    notes: list[str] = []
    client: SshClient | None = None
    try:
        client = connector(target)
        notes += stop_attempt(client, tag, grace=grace)
        Remote(client, binary, env, sudo).unlock(repo, timeout=CLEANUP_TIMEOUT)
        notes.append(f"ran `restic unlock` on {target.name} (stale locks only)")
    except LabkeeperError as exc:
        problem = f"could not reach {target.name} to stop the attempt / unlock: {exc}"
        notes.append(problem + " (a restic of the attempt may still finish on the "
                     f"host and leave a snapshot tagged {tag})")
        return notes, problem
    finally:
        if client is not None:
            client.close()
    return notes, None


def discard_attempt(target: SshTarget, repo: restic.Repo, *, binary: str, env: dict[str, str],
                    sudo: bool | str, lab: str, backup_id: str,
                    connector: Callable[[SshTarget], SshClient] = connect,
                    grace: float = STOP_GRACE,
                    pending: PendingCleanups | None = None) -> list[str]:
    """After a failed attempt: no restic of it still running on the host, its lock
    removed (on the host), every snapshot carrying its tag forgotten. Uses a fresh
    SSH connection (the old one may be what failed). When any of that could not be
    done the attempt is recorded in ``pending`` for the next backup to sweep
    (:func:`sweep_pending`). Returns what was done."""
    tag = backup_tag(backup_id)
    notes, problem = _stop_and_unlock(target, repo, binary=binary, env=env, sudo=sudo,
                                      tag=tag, connector=connector, grace=grace)
    problems = [problem] if problem else []
    forgotten, note = pending_mod.forget_attempt(repo, backup_id, host=lab,
                                                 timeout=CLEANUP_TIMEOUT)
    notes.append(note)
    if not forgotten:
        problems.append(note)
    if problems:
        by_hand = (f"once no restic of it runs on {target.name} any more, forget its "
                   f"snapshots with `restic forget --tag {tag}` (and `restic unlock` on "
                   f"{target.name})")
        then = (f"the next backup of {pending.name if pending else ''} first stops any "
                f"restic of it on {target.name}, unlocks and forgets every snapshot "
                f"tagged {tag}")
        notes.append(pending_mod.record(pending, backup_id, snapshot_host=lab,
                                        reason="; ".join(problems), by_hand=by_hand,
                                        next_backup=then))
    for n in notes:
        logger.info("%s", n)
    return notes


def _sweep_one(remote: Remote, repo: restic.Repo, store: PendingCleanups,
               attempt: PendingAttempt, *, label: str, grace: float) -> tuple[bool, str]:
    """One pending attempt: (all done, the note). Raises :class:`PathBackupFailed`
    when it cannot be made sure that no restic of it still runs on the host."""
    host = remote.client.target.name
    tag = attempt.tag
    try:
        steps = stop_attempt(remote.client, tag, grace=grace) or [
            f"no process of it runs on {host}"]
    except LabkeeperError as exc:
        logger.info("%s: cleanup of attempt %s failed on %s: %s", label, attempt.backup_id,
                    host, exc)
        raise PathBackupFailed(
            f"backup of {label} not started: earlier failed attempt "
            f"{attempt.backup_id} (pending cleanup since {attempt.since}) could not be "
            f"cleaned up — it cannot be made sure that no restic of it still runs on "
            f"{host} ({exc}); such a restic may still add a snapshot tagged {tag} "
            f"to the series {series_label(store.host, store.name)}. It stays pending "
            f"in {store.path} and is swept again before the next backup",
            transient=exc.transient, path_set=label) from None
    problems: list[str] = []
    try:
        remote.unlock(repo, timeout=CLEANUP_TIMEOUT)
        steps.append(f"ran `restic unlock` on {host}")
    except LabkeeperError as exc:
        problems.append(f"`restic unlock` on {host} failed: {exc}")
    try:
        leftovers = restic.forget_tagged(repo, tag, host=attempt.snapshot_host,
                                         timeout=CLEANUP_TIMEOUT)
        steps.append("forgot snapshot(s) " + ", ".join(s.short_id or s.id[:8]
                                                       for s in leftovers)
                     if leftovers else "no snapshot of it exists")
    except LabkeeperError as exc:
        problems.append(f"could not list/forget its snapshots: {exc}")
    if problems:
        return False, (f"{label}: cleanup of earlier failed attempt {attempt.backup_id} "
                       f"(pending since {attempt.since}) is still incomplete: "
                       f"{'; '.join(problems)} (done: {'; '.join(steps)}); nothing of it "
                       f"runs any more, but a snapshot tagged {tag} may remain in the "
                       f"series; it stays pending in {store.path}")
    return True, (f"{label}: swept earlier failed attempt {attempt.backup_id} (pending "
                  f"cleanup since {attempt.since}): {'; '.join(steps)}")


def sweep_pending(remote: Remote, repo: restic.Repo, store: PendingCleanups, *, label: str,
                  grace: float) -> tuple[list[str], list[PendingAttempt]]:
    """Finish the cleanup of every pending attempt of this path set, on the connection
    of the new backup: stop any restic of it on the host (:func:`stop_attempt`), run
    ``restic unlock`` there, forget every snapshot carrying its tag; an attempt leaves
    the pending file only when all three succeeded.

    Returns (what was done, the attempts still pending because the *repository* part
    failed: nothing of them runs any more, the backup may go on). Raises
    :class:`PathBackupFailed` when it cannot be made sure that no restic of an attempt
    still runs on the host: backing up beside a restic that may still add a snapshot
    to the series is not done (the attempt stays pending)."""
    return pending_mod.sweep(
        store, lambda attempt: _sweep_one(remote, repo, store, attempt, label=label,
                                          grace=grace))
