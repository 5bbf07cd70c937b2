"""Application-update steps as Prefect tasks (thin wrappers over labkeeper.update).

``protect`` carries an ``on_rollback`` hook: inside the flow's
``with transaction():`` block (protect → update → gate), an update command that
fails or a gate that does not open makes Prefect run the hook, which puts the guest
back to the recorded protection. The hook writes its outcome to the update journal,
where the flow reads it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper import health
from labkeeper import update as core
from labkeeper.errors import is_transient
from labkeeper.inventory import Inventory
from labkeeper.secrets import redact
from tasks.common import RETRY

ROLLBACK_ATTEMPTS = 3


def _session(inv: Inventory, app: str) -> core.Session:
    return core.Session(inv, app, log=get_run_logger().info)


@task(name="update-preflight", task_run_name="preflight-{app}", timeout_seconds=900,
      cache_policy=NO_CACHE, **RETRY)
def preflight(inv: Inventory, app: str) -> core.Preflight:
    """Probes once and the maintenance window (changes nothing)."""
    with _session(inv, app) as s:
        result = core.preflight(s)
    log = get_run_logger()
    for p in result.probes:
        (log.info if p.ok else log.warning)("%s: probe %s: %s", app, p.name, p.detail)
    return result


@task(name="update-versions", task_run_name="versions-{app}", timeout_seconds=900,
      cache_policy=NO_CACHE, **RETRY)
def record_versions(inv: Inventory, app: str) -> core.Versions:
    """What runs now: images per service, packages that will change, or the version."""
    with _session(inv, app) as s:
        versions = core.record_versions(s)
    get_run_logger().info("%s: versions now: %s", app, core.fmt_versions(versions.values))
    return versions


@task(name="update-versions-after", task_run_name="versions-after-{app}",
      timeout_seconds=900, cache_policy=NO_CACHE, **RETRY)
def versions_after(inv: Inventory, app: str, before: dict[str, str]) -> dict[str, str]:
    with _session(inv, app) as s:
        return core.versions_after(s, before)


@task(name="update-fetch", task_run_name="fetch-{app}", timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def fetch(inv: Inventory, app: str, versions: core.Versions, retry_bad: bool = False
          ) -> core.Offer:
    """``docker compose pull`` and what it brought (a failed pull changes nothing and
    is retried: transient)."""
    with _session(inv, app) as s:
        offer = core.fetch(s, versions, pin=core.read_pin(inv, app), retry_bad=retry_bad)
    log = get_run_logger()
    if offer.held:
        log.warning("%s: the registry offers %s, rolled back before: not deploying it", app,
                    core.fmt_versions(offer.held))
    else:
        log.info("%s: registry offers %s (%s)", app, core.fmt_versions(offer.values),
                 f"new for {', '.join(offer.changed)}" if offer.new else "nothing new")
    return offer


@task(name="update-protect", task_run_name="protect-{app}", timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def protect(inv: Inventory, app: str, run_id: str, versions: core.Versions,
            offered: dict[str, str] | None = None) -> core.Protection:
    """Snapshot (or vzdump, or the compose images), the journal opened first: it names
    the protection before it exists, so a retry of this run knows it is its own."""
    journal = core.read_journal(inv, app)
    resume = journal is not None and journal.run_id == run_id
    with _session(inv, app) as s:
        if not resume:
            core.write_journal(inv, core.Journal(
                app=app, run_id=run_id, phase="protecting",
                protection=core.planned_protection(s, run_id, versions),
                before=dict(versions.values), started=time.time(),
                offered=dict(offered or {}), guest=s.guest.name))
        prot = core.protect(s, run_id, versions, resume=resume)
    core.write_journal(inv, core.Journal(app=app, run_id=run_id, phase="protected",
                                         protection=prot, before=dict(versions.values),
                                         started=time.time(), offered=dict(offered or {}),
                                         guest=inv.app(app).guest))
    get_run_logger().info("%s: protected by %s", app, prot.text())
    return prot


@protect.on_rollback
def _roll_back(txn: Any) -> None:
    """Prefect calls this when the update or the gate failed inside the transaction."""
    inv: Inventory = txn.get("inv")
    app: str = txn.get("app")
    roll_back_now(inv, app)


def roll_back_now(inv: Inventory, app: str) -> str:
    """Roll back to the journal's protection (a few tries on transient errors);
    the outcome lands in the journal (``rolled-back`` / ``rollback-failed``)."""
    logger = get_run_logger()
    journal = core.read_journal(inv, app)
    if journal is None:
        raise core.RollbackFailed(f"{app}: no update journal: nothing recorded to roll back to")
    journal.phase = "rolling-back"
    core.write_journal(inv, journal)
    last: BaseException | None = None
    for attempt in range(1, ROLLBACK_ATTEMPTS + 1):
        try:
            with core.Session(inv, app, log=logger.info) as s:
                detail = core.rollback(s, journal.protection)
            journal.phase, journal.detail = "rolled-back", detail
            core.write_journal(inv, journal)
            logger.warning("%s: %s", app, detail)
            return detail
        except Exception as exc:
            last = exc
            if not is_transient(exc) or attempt == ROLLBACK_ATTEMPTS:
                break
            logger.warning("%s: rollback try %d failed (%s); trying again", app, attempt, exc)
            time.sleep(2 * attempt)
    journal.phase, journal.detail = "rollback-failed", redact(f"{type(last).__name__}: {last}")
    core.write_journal(inv, journal)
    logger.error("%s: ROLLBACK FAILED: %s", app, journal.detail)
    raise core.RollbackFailed(f"{app}: rollback failed: {journal.detail}")


@task(name="update-rollback", task_run_name="rollback-{app}", timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def rollback(inv: Inventory, app: str) -> str:
    """Roll back outside a transaction (crash recovery)."""
    return roll_back_now(inv, app)


@task(name="update-run", task_run_name="update-{app}", timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def run_update(inv: Inventory, app: str) -> list[str]:
    """The strategy's commands, output streamed to the run log."""
    with _session(inv, app) as s:
        done = core.run_update(s)
    journal = core.read_journal(inv, app)
    if journal is not None:
        journal.phase = "updated"
        core.write_journal(inv, journal)
    return done


@task(name="update-attempted", task_run_name="attempted-{app}", timeout_seconds=900,
      cache_policy=NO_CACHE, **RETRY)
def record_attempted(inv: Inventory, app: str, versions: core.Versions) -> dict[str, str]:
    """The versions the update brought (apt: what it planned to install)."""
    digests: dict[str, str] = {}
    if versions.planned:
        attempted = dict(versions.planned)
    else:
        with _session(inv, app) as s:
            if s.app.strategy == "compose":
                now = core.compose_versions(s, refs=versions.refs)
                attempted, digests = now.values, now.digests
            else:
                attempted = core.versions_after(s, versions.values)
    journal = core.read_journal(inv, app)
    if journal is not None:
        journal.attempted = attempted
        if not journal.offered:
            journal.offered = {k: v for k, v in digests.items() if v}
        core.write_journal(inv, journal)
    return attempted


@task(name="update-gate", task_run_name="gate-{app}", timeout_seconds=3600,
      cache_policy=NO_CACHE, **RETRY)
def gate(inv: Inventory, app: str, raise_on_failure: bool = True) -> health.GateOutcome:
    """Probes until N healthy rounds in a row, or the deadline."""
    with _session(inv, app) as s:
        outcome = core.gate(s)
    log = get_run_logger()
    (log.info if outcome.passed else log.warning)("%s: gate %s after %d round(s): %s", app,
                                                  "open" if outcome.passed else "FAILED",
                                                  outcome.rounds, outcome.reason)
    if not outcome.passed and raise_on_failure:
        raise core.GateFailed(f"{app}: {outcome.reason}")
    return outcome


@task(name="update-protection-exists", task_run_name="check-protection-{app}",
      timeout_seconds=300, cache_policy=NO_CACHE, **RETRY)
def protection_exists(inv: Inventory, app: str, protection: core.Protection) -> bool:
    with _session(inv, app) as s:
        return core.protection_exists(s, protection)


@task(name="update-cleanup", task_run_name="cleanup-{app}", timeout_seconds=3600,
      cache_policy=NO_CACHE, **RETRY)
def cleanup(inv: Inventory, app: str) -> list[str]:
    """Old pre-update snapshots / archives beyond keep_snapshots."""
    with _session(inv, app) as s:
        return core.cleanup(s)
