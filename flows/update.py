"""Application updates with automatic rollback.

The runbook a person would follow, per app (in the order given; with ``canary`` the
batch stops when the first app had to be rolled back):

1. an unfinished update left by a crashed run? finish it first: prove health and keep
   the update (cleaning up), or roll back to its protection — only while its journal
   is recent; an older one (``stale``) is reported and waits for a person, who
   passes ``resolve="keep"`` or ``resolve="rollback"`` (or runs ``rollback-app``) —
   the journal's state machine is ``labkeeper.update.recovery``;
2. preflight: outside the maintenance window → skipped; already unhealthy → not
   touched (``force`` overrides both);
3. record the versions that run now; ``dry_run`` stops here and shows the plan;
4. Compose: pull first (a failed pull changes nothing: a transient error, no
   rollback); nothing new → ``current``; only digests rolled back before → ``held``
   (``force`` deploys them anyway);
5. back up the app's databases, then in one Prefect transaction: protect (snapshot
   ``labkeeper-pre-update-<app>-<id>`` / protected vzdump / compose images) → update
   → health gate. When the update fails or the gate stays shut, the protect task's
   ``on_rollback`` hook rolls the guest back; the flow then proves health again and
   pins a Compose app to its good images;
6. success: the new versions are recorded, the pin removed, old pre-update snapshots
   beyond ``keep_snapshots`` deleted.

Never two updates of one guest at once: each app's update holds its guest's lock
(``flock`` in the state dir; the kernel releases it when the holder dies, however it
dies). A run that cannot get it within ``settings.tuning.update_lock_timeout`` reports
the app ``blocked``.

The run ends ``Completed`` (``Skipped`` when nothing was due), ``RolledBack``
(a failed-type state: an app is back on its old version, healthy), ``NotUpdated``
(failed-type: an app is blocked, held or waits for a decision) or ``Failed``.
Artifacts ``update`` (table) and ``update-summary`` (versions and image digests
before / attempted / after); events ``labkeeper.update.{succeeded,rolled_back,failed,
skipped,blocked,held,stale}``.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed
from prefect.transactions import transaction

from labkeeper import notify
from labkeeper import update as core
from labkeeper.errors import ConfigError
from labkeeper.inventory import App, Inventory, load_inventory
from labkeeper.run_report.update import UpdateReport
from labkeeper.run_report.update import summary as summary  # tests import it here
from labkeeper.secrets import redact
from labkeeper.update.recovery import Resolve
from tasks import pg_backup as pg_tasks
from tasks import update as tu
from tasks.common import RunFailed, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "update"


class UpdateRunFailed(RunFailed):
    """An app's update failed or was rolled back."""


def select_apps(inv: Inventory, apps: list[str] | str | None, tag: str | None) -> list[App]:
    """Apps by name (in the order given), by tag, or every app."""
    if isinstance(apps, str):
        apps = [apps]
    chosen: list[App] = []
    if apps:
        for name in apps:
            app = inv.app(name)
            if app not in chosen:
                chosen.append(app)
    if tag:
        chosen += [a for a in inv.apps if tag in a.tags and a not in chosen]
    if not apps and not tag:
        chosen = list(inv.apps)
    if not chosen:
        raise ConfigError(f"no app matches (apps={apps or []}, tag={tag!r})")
    return chosen


@flow(name="update-app", log_prints=False, timeout_seconds=12 * 3600, **hooks("update"))
def update_app_flow(apps: list[str] | None = None, tag: str | None = None,
                    lab: str | None = None, dry_run: bool = False, force: bool = False,
                    canary: bool = False, resolve: Resolve | None = None) -> Any:
    """Update apps (by name, by ``tag``, or all) with protection, a health gate and
    automatic rollback. How long to wait for another update of the same guest is the
    inventory's ``settings.tuning.update_lock_timeout``.

    Args:
        apps: Only these apps (their names in the inventory); empty: every app (or
            those with the tag below).
        tag: Only the apps carrying this tag.
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        dry_run: Check health and show versions and the commands, changing nothing.
        force: Also update outside the maintenance window, apps that are unhealthy now,
            and images that were rolled back before.
        canary: Stop the batch when the first app was rolled back.
        resolve: Your decision for an unfinished update too old to finish on its own:
            keep what runs now, or rollback to its protection. Empty: no decision.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    lock_timeout = inv.settings.tuning.update_lock_timeout
    chosen = select_apps(inv, apps, tag)
    logger.info("update: %d app(s): %s%s%s", len(chosen), ", ".join(a.name for a in chosen),
                " (dry run)" if dry_run else "", " (canary)" if canary else "")
    results: list[core.AppResult] = []
    stop_reason = ""
    for index, app in enumerate(chosen):
        if stop_reason:
            results.append(core.AppResult(app.name, "skipped", stop_reason))
            continue
        with core.timed() as elapsed:
            result = _guarded(inv, app, dry_run=dry_run, force=force,
                              lock_timeout=lock_timeout, resolve=resolve)
        result.seconds = elapsed()
        results.append(result)
        log = logger.info if result.status in ("updated", "current", "recovered", "dry-run",
                                               "skipped") else logger.error
        log("%s: %s — %s", app.name, result.status, redact(result.detail))
        if canary and index == 0 and len(chosen) > 1 and \
                result.status in ("rolled-back", "failed"):
            stop_reason = f"canary {app.name} {result.status}: batch stopped"
            logger.error(stop_reason)
    UpdateReport(inv, ARTIFACT_KEY, logger).finish(results, dry_run)
    if not dry_run:
        _notify_rollbacks(inv, results)
    return _final_state(results)


def _guarded(inv: Inventory, app: App, *, dry_run: bool, force: bool, lock_timeout: float,
             resolve: Resolve | None = None) -> core.AppResult:
    """One app under its guest's lock (a dry run changes nothing: no lock)."""
    if dry_run:
        return _update_one(inv, app, dry_run=True, force=force)
    try:
        with core.guest_lock(inv, app.guest, holder=f"update of {app.name}",
                             timeout=lock_timeout):
            return _update_one(inv, app, dry_run=False, force=force, resolve=resolve)
    except core.GuestBusy as exc:
        return core.AppResult(app.name, "blocked", f"not updated: {exc}")


def _update_one(inv: Inventory, app: App, *, dry_run: bool, force: bool,
                resolve: Resolve | None = None) -> core.AppResult:
    name = app.name
    journal = core.read_journal(inv, name)
    if journal is not None:
        finished = _recovery(inv).unfinished(app, journal, dry_run=dry_run, resolve=resolve)
        if finished is not None:
            return finished

    pre: core.Preflight = tu.preflight(inv, name)
    if not pre.in_window and not force:
        return core.AppResult(name, "skipped", pre.reason)
    if not pre.healthy and not force:
        return core.AppResult(name, "skipped", f"not updated: {pre.reason}")
    if pre.reason:
        get_run_logger().warning("%s: forced despite: %s", name, pre.reason)

    versions: core.Versions = tu.record_versions(inv, name)
    if dry_run:
        return _dry_run(inv, app, versions)
    timings: dict[str, float] = {}
    offer: core.Offer | None = None
    if core.fetches_first(app):
        with core.timed() as took:
            try:
                offer = tu.fetch(inv, name, versions, retry_bad=force)
            except core.PullFailed as exc:
                return core.AppResult(name, "failed", f"not updated: pull failed "
                                      f"(transient, retried): {redact(str(exc))}",
                                      before=versions.values)
        timings["fetch"] = took()
        settled = _nothing_to_deploy(inv, app, versions, offer)
        if settled is not None:
            settled.timings = timings
            return settled
    return _protected_update(inv, app, versions, offer, timings)


def _dry_run(inv: Inventory, app: App, versions: core.Versions) -> core.AppResult:
    plan = [" ".join(argv) for argv in core.update_steps(app)]
    mode = inv.rollback_mode(app)
    what = {"snapshot": "a snapshot", "vzdump": "a protected vzdump backup",
            "compose-images": "the current images (kept by a tag)", "none": "nothing"}[mode]
    dbs = f" and back up databases {', '.join(app.databases)}" if app.databases else ""
    pin = core.read_pin(inv, app.name)
    pinned = f"; {pin.text()}" if pin else ""
    return core.AppResult(app.name, "dry-run",
                          f"would protect with {what}{dbs}, run {len(plan)} command(s), "
                          f"then gate on {len(app.health)} probe(s){pinned}",
                          protection=f"{mode} (not taken)", before=versions.values,
                          attempted=dict(versions.planned), plan=plan)


def _nothing_to_deploy(inv: Inventory, app: App, versions: core.Versions,
                       offer: core.Offer) -> core.AppResult | None:
    """The registry offers what runs (current) or only known-bad digests (held)."""
    digests = {"before": versions.digests, "offered": offer.digests}
    if offer.held:
        pin = core.read_pin(inv, app.name)
        return core.AppResult(app.name, "held",
                              "not updated: the registry still offers "
                              f"{core.fmt_versions(offer.held)}, rolled back before; "
                              f"{pin.text() if pin else 'pinned'} (a new digest in the "
                              "registry, or force, deploys again)",
                              before=versions.values, attempted=offer.values,
                              after=versions.values, digests=digests)
    if offer.new:
        return None
    cleared = core.clear_pin(inv, app.name)
    return core.AppResult(app.name, "current",
                          "up to date: the registry offers what runs"
                          + ("; pin removed" if cleared else ""),
                          before=versions.values, after=versions.values, digests=digests)


def _protected_update(inv: Inventory, app: App, versions: core.Versions,
                      offer: core.Offer | None, timings: dict[str, float]) -> core.AppResult:
    name = app.name
    plan = [" ".join(argv) for argv in core.update_steps(app)]
    for db in app.databases:
        pg_tasks.backup_database(inv, db)
    run_id = core.new_run_id()
    gate_task = tu.gate.with_options(timeout_seconds=app.gate.deadline + 300)
    prot: core.Protection | None = None
    attempted: dict[str, str] = {}
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[step] = round(now - clock, 3)
        clock = now

    try:
        with transaction() as txn:
            txn.set("inv", inv)
            txn.set("app", name)
            prot = tu.protect(inv, name, run_id, versions,
                              offer.digests if offer is not None else None)
            lap("protect")
            tu.run_update(inv, name)
            lap("update")
            attempted = tu.record_attempted(inv, name, versions)
            lap("attempted")
            gate_task(inv, name)
            lap("gate")
    except Exception as exc:
        result = _recovery(inv).after_rollback(app, exc, prot, versions.values, attempted,
                                               run_id)
        result.timings = timings
        return result

    removed = tu.cleanup(inv, name)
    after = tu.versions_after(inv, name, versions.values)
    unpinned = core.close_updated(inv, name)
    lap("cleanup")
    digests = {"before": versions.digests, "after": offer.digests} if offer else {}
    return core.AppResult(name, "updated", "healthy after the update"
                          + ("; pin removed" if unpinned else ""),
                          protection=prot.text() if prot else "", before=versions.values,
                          attempted=attempted, after=after, removed=removed, run_id=run_id,
                          plan=plan, digests=digests, timings=timings)


def _recovery(inv: Inventory) -> core.Recovery:
    """The journal's state machine, acting through this flow's task runs."""
    return core.Recovery(inv, tu.TaskSteps(inv))


# ====================================================================== reporting


def _final_state(results: list[core.AppResult]) -> Any:
    rows = [r.row() for r in results]
    failed = [r for r in results if r.status == "failed"]
    rolled = [r for r in results if r.status == "rolled-back"]
    if failed:
        msg = "; ".join(f"{r.app}: {r.detail}" for r in failed)
        return Failed(message=redact(f"{len(failed)} app update(s) failed — {msg}")[:2000],
                      data=UpdateRunFailed(redact(msg), rows))
    if rolled:
        msg = ", ".join(r.app for r in rolled)
        return Failed(name="RolledBack",
                      message=f"rolled back: {msg} (back on the previous version, healthy)",
                      data=UpdateRunFailed(f"rolled back: {msg}", rows))
    not_done = [r for r in results if r.status in core.NOT_DONE]
    if not_done:  # never a silent success: blocked, held, or waiting for a person
        msg = "; ".join(f"{r.app}: {r.status}: {r.detail}" for r in not_done)
        return Failed(name="NotUpdated", message=redact(msg)[:2000],
                      data=UpdateRunFailed(redact(msg), rows))
    if results and all(r.status == "skipped" for r in results):
        return Completed(name="Skipped", message="; ".join(f"{r.app}: {r.detail}"
                                                           for r in results)[:2000],
                         data=rows)
    return rows


def _notify_rollbacks(inv: Inventory, results: list[core.AppResult]) -> None:
    for r in results:
        if r.status == "rolled-back":
            notify.notify(inv, "rollback", f"labkeeper: {r.app} update rolled back",
                          f"{redact(r.detail)}\nbefore: {core.fmt_versions(r.before)}\n"
                          f"attempted: {core.fmt_versions(r.attempted)}\n"
                          f"now: {core.fmt_versions(r.after)}\nlab: {inv.lab.name}")


if __name__ == "__main__":
    update_app_flow()
