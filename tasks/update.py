"""Application-update steps as Prefect tasks (thin wrappers over labkeeper.update).

``protect`` carries an ``on_rollback`` hook: inside the flow's
``with transaction():`` block (protect → update → gate), an update command that
fails or a gate that does not open makes Prefect run the hook, which puts the guest
back to the recorded protection. Every journal change is
:mod:`labkeeper.update.recovery`'s; the flow reads the outcome there.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper import health
from labkeeper import update as core
from labkeeper.inventory import Inventory
from labkeeper.update import recovery
from tasks.common import RETRY


def _session(inv: Inventory, app: str) -> core.Session:
    return core.Session(inv, app)


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
    """Snapshot (or vzdump, or the compose images), the journal opened first."""
    with _session(inv, app) as s:
        prot = recovery.protect_journaled(s, run_id, versions, offered)
    get_run_logger().info("%s: protected by %s", app, prot.text())
    return prot


@protect.on_rollback
def _roll_back(txn: Any) -> None:
    """Prefect calls this when the update or the gate failed inside the transaction."""
    inv: Inventory = txn.get("inv")
    app: str = txn.get("app")
    recovery.roll_back(inv, app)


@task(name="update-rollback", task_run_name="rollback-{app}", timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def rollback(inv: Inventory, app: str) -> str:
    """Roll back outside a transaction (crash recovery)."""
    return recovery.roll_back(inv, app)


@task(name="update-run", task_run_name="update-{app}", timeout_seconds=4 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def run_update(inv: Inventory, app: str) -> list[str]:
    """The strategy's commands, output streamed to the run log."""
    with _session(inv, app) as s:
        done = core.run_update(s)
    recovery.mark_updated(inv, app)
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
    recovery.note_attempted(inv, app, attempted, digests)
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


class TaskSteps:
    """Crash recovery's steps on the guest as task runs (:class:`recovery.Steps`)."""

    def __init__(self, inv: Inventory) -> None:
        self.inv = inv

    def gate(self, app: str) -> health.GateOutcome:
        return gate(self.inv, app, raise_on_failure=False)

    def versions_after(self, app: str, before: dict[str, str]) -> dict[str, str]:
        return versions_after(self.inv, app, before)

    def cleanup(self, app: str) -> list[str]:
        return cleanup(self.inv, app)

    def protection_exists(self, app: str, protection: core.Protection) -> bool:
        return protection_exists(self.inv, app, protection)

    def rollback(self, app: str) -> str:
        return rollback(self.inv, app)
