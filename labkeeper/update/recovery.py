"""The update journal's state machine: every phase change, and crash recovery.

One update walks ``protecting`` → ``protected`` → ``updated`` and is closed on
success; a failure walks ``rolling-back`` → ``rolled-back`` (or ``rollback-failed``:
a person repairs the app). A journal still open when the next run starts means its
run died: :class:`Recovery` finishes it — proves health and keeps the update, or
rolls back to its protection — but only while the journal is recent; an older one
(``stale``) waits for a person's ``resolve``. The steps on the guest come in through
:class:`Steps` (the flow passes Prefect task runs), so this module decides and the
caller runs.
"""

from __future__ import annotations

import logging
import time
from typing import Literal, Protocol

from labkeeper import health
from labkeeper.errors import is_transient
from labkeeper.inventory import App, Inventory
from labkeeper.secrets import redact
from labkeeper.update.actions import planned_protection, protect, rollback
from labkeeper.update.records import (
    AppResult,
    GateFailed,
    Journal,
    Protection,
    RollbackFailed,
    Versions,
)
from labkeeper.update.session import Session
from labkeeper.update.state import (
    clear_pin,
    close_journal,
    is_stale,
    journal_age,
    journal_path,
    pin_after_rollback,
    read_journal,
    write_journal,
)

Resolve = Literal["keep", "rollback"]
ROLLBACK_ATTEMPTS = 3

logger = logging.getLogger(__name__)


# ====================================================================== phase changes


def protect_journaled(s: Session, run_id: str, versions: Versions,
                      offered: dict[str, str] | None = None) -> Protection:
    """Protect the guest, the journal opened first: it names the protection before it
    exists, so a retry of this run knows the snapshot is its own."""
    inv, app = s.inv, s.app.name
    journal = read_journal(inv, app)
    resume = journal is not None and journal.run_id == run_id
    if not resume:
        write_journal(inv, Journal(
            app=app, run_id=run_id, phase="protecting",
            protection=planned_protection(s, run_id, versions),
            before=dict(versions.values), started=time.time(),
            offered=dict(offered or {}), guest=s.guest.name))
    prot = protect(s, run_id, versions, resume=resume)
    write_journal(inv, Journal(app=app, run_id=run_id, phase="protected", protection=prot,
                               before=dict(versions.values), started=time.time(),
                               offered=dict(offered or {}), guest=inv.app(app).guest))
    return prot


def mark_updated(inv: Inventory, app: str) -> None:
    """The update's commands ran."""
    journal = read_journal(inv, app)
    if journal is not None:
        journal.phase = "updated"
        write_journal(inv, journal)


def note_attempted(inv: Inventory, app: str, attempted: dict[str, str],
                   digests: dict[str, str]) -> None:
    """The versions the update brought (and, unless known, the digests it deployed)."""
    journal = read_journal(inv, app)
    if journal is not None:
        journal.attempted = attempted
        if not journal.offered:
            journal.offered = {k: v for k, v in digests.items() if v}
        write_journal(inv, journal)


def close_updated(inv: Inventory, app: str) -> bool:
    """The update is kept: close its journal and drop a pin; was the app pinned?"""
    close_journal(inv, app)
    return clear_pin(inv, app)


def roll_back(inv: Inventory, app: str) -> str:
    """Roll back to the journal's protection (a few tries on transient errors);
    the outcome lands in the journal (``rolled-back`` / ``rollback-failed``)."""
    journal = read_journal(inv, app)
    if journal is None:
        raise RollbackFailed(f"{app}: no update journal: nothing recorded to roll back to")
    journal.phase = "rolling-back"
    write_journal(inv, journal)
    last: BaseException | None = None
    for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
        try:
            with Session(inv, app) as s:
                detail = rollback(s, journal.protection)
            journal.phase, journal.detail = "rolled-back", detail
            write_journal(inv, journal)
            logger.warning("%s: %s", app, detail)
            return detail
        except Exception as exc:
            last = exc
            if not is_transient(exc) or attempt == ROLLBACK_ATTEMPTS:
                break
            logger.warning("%s: rollback try %d failed (%s); trying again", app, attempt, exc)
            time.sleep(2 * attempt)
    journal.phase, journal.detail = "rollback-failed", redact(f"{type(last).__name__}: {last}")
    write_journal(inv, journal)
    logger.error("%s: ROLLBACK FAILED: %s", app, journal.detail)
    raise RollbackFailed(f"{app}: rollback failed: {journal.detail}")


# ====================================================================== crash recovery


class Steps(Protocol):
    """What recovery does on the guest (the flow passes Prefect task runs)."""

    def gate(self, app: str) -> health.GateOutcome:
        """The health gate; a gate that stays shut is returned, not raised."""
        ...

    def versions_after(self, app: str, before: dict[str, str]) -> dict[str, str]: ...

    def cleanup(self, app: str) -> list[str]: ...

    def protection_exists(self, app: str, protection: Protection) -> bool: ...

    def rollback(self, app: str) -> str:
        """:func:`roll_back`, as the caller runs it."""
        ...


class Recovery:
    """Judges what a journal says: after a failed update, and at the start of a run."""

    def __init__(self, inv: Inventory, steps: Steps) -> None:
        self.inv = inv
        self.steps = steps

    def unfinished(self, app: App, journal: Journal, *, dry_run: bool,
                   resolve: Resolve | None) -> AppResult | None:
        """An update a crashed run left: a result when it decides this run, else None
        (the journal was closed: go on with a fresh update)."""
        inv, name = self.inv, app.name
        base = AppResult(name, "failed", protection=journal.protection.text(),
                         before=journal.before, attempted=journal.attempted,
                         run_id=journal.run_id)
        if dry_run:
            base.status = "dry-run"
            base.detail = (f"run {journal.run_id} stopped after '{journal.phase}': the next "
                           "run finishes it (proves health, keeps or rolls back) before any "
                           "new update")
            return base
        if journal.phase == "rollback-failed":
            base.detail = (f"an earlier rollback (run {journal.run_id}) failed: "
                           f"{journal.detail}; repair the app, then delete "
                           f"{journal_path(inv, name)}")
            return base
        if journal.phase == "rolled-back":
            close_journal(inv, name)  # the run died after rolling back: it is done
            return None
        if resolve is None and is_stale(journal, app):
            return self._stale(app, journal, base)
        if self.steps.protection_exists(name, journal.protection):
            return self._recover(app, journal, resolve=resolve)
        logger.warning("%s: the journal of run %s names %s, which is gone; starting afresh",
                       name, journal.run_id, journal.protection.text())
        close_journal(inv, name)
        return None

    def _stale(self, app: App, journal: Journal, base: AppResult) -> AppResult:
        """Too old to act on alone: rolling back now could throw away days of data."""
        age = journal_age(journal)
        base.status = "stale"
        base.detail = (f"run {journal.run_id} stopped after '{journal.phase}' "
                       f"{age / 3600:.1f} h ago (protected by {journal.protection.text()}); "
                       "too old to finish automatically (data may have changed since): "
                       "check the app, then run the update with resolve=keep (keep what "
                       "runs) or resolve=rollback (back to that protection), or the "
                       "rollback-app runbook")
        logger.error("%s: %s", app.name, base.detail)
        return base

    def after_rollback(self, app: App, exc: BaseException, prot: Protection | None,
                       before: dict[str, str], attempted: dict[str, str],
                       run_id: str) -> AppResult:
        """The update failed: what did the rollback do, and is the app healthy?"""
        inv, name = self.inv, app.name
        why = redact(f"{type(exc).__name__}: {exc}")
        journal = read_journal(inv, name)
        if prot is None or journal is None or journal.run_id != run_id:
            # protect itself failed: nothing was changed on the guest
            if journal is not None and journal.run_id == run_id and \
                    journal.phase == "protecting":
                close_journal(inv, name)
            return AppResult(name, "failed", f"not updated: protection failed: {why}",
                             before=before, run_id=run_id)
        result = AppResult(name, "failed", why, protection=prot.text(), before=before,
                           attempted=attempted or journal.attempted, run_id=run_id)
        if journal.phase != "rolled-back":
            result.detail = f"{why}; rollback: {journal.phase} {journal.detail}".strip()
            return result
        proof = self.steps.gate(name)
        result.after = self.steps.versions_after(name, before)
        if proof.passed:
            pin = pin_after_rollback(inv, journal, why)
            close_journal(inv, name)
            result.status = "rolled-back"
            result.detail = f"{why}; {journal.detail}; healthy again" + \
                (f"; {pin.text()}" if pin else "")
            if pin:
                result.digests = {"before and after": pin.digests,
                                  "rolled back from": journal.offered}
        else:
            journal.phase, journal.detail = "rollback-failed", \
                f"{journal.detail}, but still unhealthy: {proof.reason}"
            write_journal(inv, journal)
            result.detail = f"{why}; {journal.detail}"
        return result

    def _recover(self, app: App, journal: Journal, *,
                 resolve: Resolve | None = None) -> AppResult:
        """Finish the update a crashed run left behind (recent, or as a person decided)."""
        name = app.name
        logger.warning("%s: run %s stopped after '%s' (protected by %s): finishing it%s",
                       name, journal.run_id, journal.phase, journal.protection.text(),
                       f" ({resolve}, as decided)" if resolve else "")
        base = AppResult(name, "recovered", protection=journal.protection.text(),
                         before=journal.before, attempted=journal.attempted,
                         run_id=journal.run_id)
        if resolve == "rollback":
            why = f"run {journal.run_id} left '{journal.phase}'; rollback as decided"
        elif resolve == "keep":
            return self._keep(app, journal, base, "kept as decided")
        else:
            outcome = self.steps.gate(name)
            if outcome.passed and journal.phase != "rolling-back":
                return self._keep(app, journal, base, "healthy: kept the update")
            if outcome.passed and self._back_on_before(name, journal):
                # the rollback had finished before the run died: do not roll back again
                journal.phase, journal.detail = "rolled-back", "the rollback had completed"
                write_journal(self.inv, journal)
                return self._rolled_back(app, journal,
                                         f"run {journal.run_id} died while rolling back")
            why = f"run {journal.run_id} died after '{journal.phase}'; {outcome.reason}"
        try:
            self.steps.rollback(name)
        except Exception as exc:
            base.status, base.detail = "failed", f"{why}; rollback failed: {redact(str(exc))}"
            return base
        return self._rolled_back(app, journal, why)

    def _rolled_back(self, app: App, journal: Journal, why: str) -> AppResult:
        return self.after_rollback(app, GateFailed(why), journal.protection, journal.before,
                                   journal.attempted, journal.run_id)

    def _keep(self, app: App, journal: Journal, base: AppResult, how: str) -> AppResult:
        base.removed = self.steps.cleanup(app.name)
        base.after = self.steps.versions_after(app.name, journal.before)
        base.detail = f"run {journal.run_id} died after '{journal.phase}'; {how}"
        close_updated(self.inv, app.name)
        return base

    def _back_on_before(self, name: str, journal: Journal) -> bool:
        """Does the app run exactly what it ran before the update (a finished rollback)?"""
        if not journal.before:
            return False
        return self.steps.versions_after(name, journal.before) == journal.before
