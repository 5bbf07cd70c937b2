"""Nothing half-done of a failed database attempt survives: every snapshot carrying
its ``backup:<id>`` tag is forgotten and the locks killed restics left are removed
(:func:`discard_attempt`). When that ``forget`` cannot run, the attempt is recorded in
``<settings.state_dir>/pg_backup/pending-<db>.json`` (:mod:`labkeeper.pending`) and
the next backup of the database forgets its snapshots first (:func:`sweep_pending`);
until then its dump has no manifest and counts as a backup nowhere.
"""

from __future__ import annotations

import logging

from labkeeper import pending as pending_mod
from labkeeper import restic
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Inventory
from labkeeper.pg_backup.naming import backup_tag

logger = logging.getLogger(__name__)

CLEANUP_TIMEOUT = 90.0


def discard_attempt(repo: restic.Repo, *, host: str, backup_id: str, unlock: bool,
                    timeout: float = CLEANUP_TIMEOUT,
                    pending: pending_mod.PendingStore | None = None) -> list[str]:
    """Forget every snapshot of one failed attempt and remove the lock a killed restic
    left. When the forget cannot be done the attempt is recorded in ``pending`` for the
    next backup of the series to sweep (:func:`sweep_pending`). Returns what was done
    (or why it could not be)."""
    forgotten, note = pending_mod.forget_attempt(repo, backup_id, host=host, timeout=timeout)
    notes = [note]
    if not forgotten:
        notes.append(record_pending(pending, backup_id, host=host, reason=note))
    if unlock:
        try:
            restic.unlock(repo, timeout=timeout)
            notes.append("removed the stale lock of the stopped restic (restic unlock)")
        except LabkeeperError as exc:
            notes.append(f"restic unlock failed: {exc}")
    for n in notes:
        logger.info("%s", n)
    return notes


# -- failed attempts whose cleanup did not finish (labkeeper.pending) --------------------

PENDING_DIR = "pg_backup"
def pending_owner(name: str, series: str) -> pending_mod.Owner:
    """One database's pending file: ``<state_dir>/pg_backup/pending-<db>.json`` (an
    inventory database name is unique in the lab and cannot hold ``.`` or ``/``)."""
    return pending_mod.Owner(PENDING_DIR, (("database", name, "database"),), series)


def pending_store(inv: Inventory, name: str) -> pending_mod.PendingStore:
    db = inv.database(name)
    series = f"db:{inv.database_server(db)}/{db.name}"
    return pending_mod.PendingStore(inv.settings.state_dir, pending_owner(db.name, series))


def record_pending(store: pending_mod.PendingStore | None, backup_id: str, *, host: str,
                   reason: str) -> str:
    """Remember a failed attempt whose snapshots could not be forgotten; returns the
    note saying so (or how to do it by hand when even that failed)."""
    tag = backup_tag(backup_id)
    return pending_mod.record(
        store, backup_id, snapshot_host=host, reason=reason,
        by_hand=f"forget its snapshots with `restic forget --tag {tag} --host {host}`",
        next_backup=(f"the next backup of {store.owner.label if store else ''} first "
                     f"forgets every snapshot tagged {tag}"))


def sweep_pending(repo: restic.Repo, store: pending_mod.PendingStore, *,
                  timeout: float = CLEANUP_TIMEOUT
                  ) -> tuple[list[str], list[pending_mod.PendingAttempt]]:
    """Forget every snapshot of each pending attempt of this database; an attempt leaves
    the file only once that succeeded. Returns (what was done, the attempts still
    pending). Nothing of a pending attempt runs any more (its restics were stopped
    before it was recorded), so a failed sweep does not stop the new backup."""
    label = store.owner.label

    def clean(attempt: pending_mod.PendingAttempt) -> tuple[bool, str]:
        try:
            leftovers = restic.forget_tagged(repo, attempt.tag, host=attempt.snapshot_host,
                                             timeout=timeout)
        except LabkeeperError as exc:
            return False, (f"{label}: cleanup of earlier failed attempt {attempt.backup_id} "
                           f"(pending since {attempt.since}) is still incomplete: {exc}; a "
                           f"dump without a manifest tagged {attempt.tag} may remain in the "
                           f"series (never counted as a backup); it stays pending in "
                           f"{store.path}")
        step = "forgot snapshot(s) " + ", ".join(s.id for s in leftovers) \
            if leftovers else "no snapshot of it exists"
        return True, (f"{label}: swept earlier failed attempt {attempt.backup_id} (pending "
                      f"cleanup since {attempt.since}): {step}")

    return pending_mod.sweep(store, clean)

