"""Application updates with automatic rollback.

The runbook a person would follow, per app (in the order given; with ``canary`` the
batch stops when the first app had to be rolled back):

1. an unfinished update left by a crashed run? finish it first: prove health and keep
   the update (cleaning up), or roll back to its protection;
2. preflight: outside the maintenance window → skipped; already unhealthy → not
   touched (``force`` overrides both);
3. record the versions that run now; ``dry_run`` stops here and shows the plan;
4. back up the app's databases, then in one Prefect transaction: protect (snapshot
   ``labkeeper-pre-update-<run>`` / vzdump / compose image IDs) → update → health
   gate. When the update fails or the gate stays shut, the protect task's
   ``on_rollback`` hook rolls the guest back; the flow then proves health again;
5. success: the new versions are recorded and old pre-update snapshots beyond
   ``keep_snapshots`` deleted.

Never two updates of one app at once: each app's update holds the global
concurrency limit ``labkeeper-update-<app>`` (limit 1, created when missing); a run
that cannot get it within ``lock_timeout`` skips the app.

The run ends ``Completed`` (``Skipped`` when nothing was due), ``RolledBack``
(a failed-type state: an app is back on its old version, healthy), or ``Failed``.
Artifacts ``update`` (table) and ``update-summary`` (versions before / attempted /
after); events ``labkeeper.update.{succeeded,rolled_back,failed,skipped}``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Completed, Failed, State
from prefect.transactions import transaction

from labkeeper import metrics, notify
from labkeeper import update as core
from labkeeper.errors import ConfigError
from labkeeper.inventory import App, Inventory, load_inventory
from labkeeper.secrets import redact
from tasks import pg_backup as pg_tasks
from tasks import update as tu
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "update"


class UpdateRunFailed(RunFailed):
    """An app's update failed or was rolled back."""


def limit_name(app: str) -> str:
    return f"labkeeper-update-{app}"


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


def ensure_limit(name: str, limit: int = 1) -> None:
    """Create the global concurrency limit if it does not exist yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit))
        except ObjectAlreadyExists:
            pass


@flow(name="update-app", log_prints=False, timeout_seconds=12 * 3600, **hooks("update"))
def update_app_flow(apps: list[str] | None = None, tag: str | None = None,
                    lab: str | None = None, dry_run: bool = False, force: bool = False,
                    canary: bool = False, lock_timeout: float = 10.0) -> Any:
    """Update apps (by name, by ``tag``, or all) with protection, a health gate and
    automatic rollback.

    ``dry_run`` checks health and shows versions and the commands without changing
    anything; ``force`` updates outside the maintenance window and apps that are
    unhealthy now; ``canary`` stops the batch when the first app rolled back;
    ``lock_timeout`` is how long to wait for another update of the same app.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
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
                              lock_timeout=lock_timeout)
        result.seconds = elapsed()
        results.append(result)
        log = logger.info if result.status in ("updated", "recovered", "dry-run", "skipped") \
            else logger.error
        log("%s: %s — %s", app.name, result.status, redact(result.detail))
        if canary and index == 0 and len(chosen) > 1 and \
                result.status in ("rolled-back", "failed"):
            stop_reason = f"canary {app.name} {result.status}: batch stopped"
            logger.error(stop_reason)
    _report(inv, results, dry_run)
    return _final_state(results)


def _guarded(inv: Inventory, app: App, *, dry_run: bool, force: bool,
             lock_timeout: float) -> core.AppResult:
    """One app under its concurrency limit (a dry run changes nothing: no lock)."""
    if dry_run:
        return _update_one(inv, app, dry_run=True, force=force)
    name = limit_name(app.name)
    ensure_limit(name)
    slot = contextlib.ExitStack()
    try:  # only taking the slot may time out here (Prefect raises a TimeoutError subclass)
        slot.enter_context(concurrency(name, occupy=1, timeout_seconds=lock_timeout,
                                       strict=True))
    except TimeoutError:
        return core.AppResult(app.name, "skipped",
                              f"another update of {app.name} is running (limit {name})")
    with slot:
        return _update_one(inv, app, dry_run=False, force=force)


def _update_one(inv: Inventory, app: App, *, dry_run: bool, force: bool) -> core.AppResult:
    logger = get_run_logger()
    name = app.name
    journal = core.read_journal(inv, name)
    if journal is not None and dry_run:
        return core.AppResult(name, "dry-run",
                              f"run {journal.run_id} stopped after '{journal.phase}': the "
                              "next run finishes it (proves health, keeps or rolls back) "
                              "before any new update",
                              protection=journal.protection.text(), before=journal.before,
                              attempted=journal.attempted, run_id=journal.run_id)
    if journal is not None:
        if journal.phase == "rollback-failed":
            return core.AppResult(name, "failed",
                                  f"an earlier rollback (run {journal.run_id}) failed: "
                                  f"{journal.detail}; repair the app, then delete "
                                  f"{core.journal_path(inv, name)}",
                                  protection=journal.protection.text(), before=journal.before,
                                  attempted=journal.attempted, run_id=journal.run_id)
        if journal.phase == "rolled-back":
            core.close_journal(inv, name)  # the run died after rolling back: it is done
        elif tu.protection_exists(inv, name, journal.protection):
            return _recover(inv, app, journal)
        else:
            logger.warning("%s: the journal of run %s names %s, which is gone; starting "
                           "afresh", name, journal.run_id, journal.protection.text())
            core.close_journal(inv, name)

    pre: core.Preflight = tu.preflight(inv, name)
    if not pre.in_window and not force:
        return core.AppResult(name, "skipped", pre.reason)
    if not pre.healthy and not force:
        return core.AppResult(name, "skipped", f"not updated: {pre.reason}")
    if pre.reason:
        logger.warning("%s: forced despite: %s", name, pre.reason)

    versions: core.Versions = tu.record_versions(inv, name)
    plan = [" ".join(argv) for argv in core.update_steps(app)]
    mode = inv.rollback_mode(app)
    if dry_run:
        what = {"snapshot": "a snapshot", "vzdump": "a vzdump backup",
                "compose-images": "the current image IDs", "none": "nothing"}[mode]
        dbs = f" and back up databases {', '.join(app.databases)}" if app.databases else ""
        return core.AppResult(name, "dry-run",
                              f"would protect with {what}{dbs}, run {len(plan)} command(s), "
                              f"then gate on {len(app.health)} probe(s)",
                              protection=f"{mode} (not taken)", before=versions.values,
                              attempted=dict(versions.planned), plan=plan)

    for db in app.databases:
        pg_tasks.backup_database(inv, db)
    run_id = core.new_run_id()
    gate_task = tu.gate.with_options(timeout_seconds=app.gate.deadline + 300)
    prot: core.Protection | None = None
    attempted: dict[str, str] = {}
    try:
        with transaction() as txn:
            txn.set("inv", inv)
            txn.set("app", name)
            prot = tu.protect(inv, name, run_id, versions)
            tu.run_update(inv, name)
            attempted = tu.record_attempted(inv, name, versions)
            gate_task(inv, name)
    except Exception as exc:
        return _after_rollback(inv, app, exc, prot, versions.values, attempted, run_id)

    removed = tu.cleanup(inv, name)
    after = tu.versions_after(inv, name, versions.values)
    core.close_journal(inv, name)
    return core.AppResult(name, "updated", "healthy after the update",
                          protection=prot.text() if prot else "", before=versions.values,
                          attempted=attempted, after=after, removed=removed, run_id=run_id,
                          plan=plan)


def _after_rollback(inv: Inventory, app: App, exc: BaseException,
                    prot: core.Protection | None, before: dict[str, str],
                    attempted: dict[str, str], run_id: str) -> core.AppResult:
    """The transaction failed: what did the rollback hook do, and is the app healthy?"""
    name = app.name
    why = redact(f"{type(exc).__name__}: {exc}")
    journal = core.read_journal(inv, name)
    if prot is None or journal is None or journal.run_id != run_id:
        # protect itself failed: nothing was changed on the guest
        return core.AppResult(name, "failed", f"not updated: protection failed: {why}",
                              before=before, run_id=run_id)
    result = core.AppResult(name, "failed", why, protection=prot.text(), before=before,
                            attempted=attempted or journal.attempted, run_id=run_id)
    if journal.phase != "rolled-back":
        result.detail = f"{why}; rollback: {journal.phase} {journal.detail}".strip()
        return result
    proof: Any = tu.gate(inv, name, raise_on_failure=False)
    result.after = tu.versions_after(inv, name, before)
    if proof.passed:
        core.close_journal(inv, name)
        result.status = "rolled-back"
        result.detail = f"{why}; {journal.detail}; healthy again"
    else:
        journal.phase, journal.detail = "rollback-failed", \
            f"{journal.detail}, but still unhealthy: {proof.reason}"
        core.write_journal(inv, journal)
        result.detail = f"{why}; {journal.detail}"
    return result


def _recover(inv: Inventory, app: App, journal: core.Journal) -> core.AppResult:
    """Finish the update a crashed run left behind."""
    logger = get_run_logger()
    name = app.name
    logger.warning("%s: run %s stopped after '%s' (protected by %s): finishing it", name,
                   journal.run_id, journal.phase, journal.protection.text())
    base = core.AppResult(name, "recovered", protection=journal.protection.text(),
                          before=journal.before, attempted=journal.attempted,
                          run_id=journal.run_id)
    if journal.phase != "rolling-back":
        outcome: Any = tu.gate(inv, name, raise_on_failure=False)
        if outcome.passed:
            base.removed = tu.cleanup(inv, name)
            base.after = tu.versions_after(inv, name, journal.before)
            base.detail = (f"run {journal.run_id} died after '{journal.phase}'; healthy: "
                           "kept the update")
            core.close_journal(inv, name)
            return base
        why = f"run {journal.run_id} died after '{journal.phase}'; {outcome.reason}"
    else:
        why = f"run {journal.run_id} died while rolling back"
    try:
        tu.rollback(inv, name)
    except Exception as exc:
        base.status, base.detail = "failed", f"{why}; rollback failed: {redact(str(exc))}"
        return base
    return _after_rollback(inv, app, core.GateFailed(why), journal.protection, journal.before,
                           journal.attempted, journal.run_id)


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
    if results and all(r.status == "skipped" for r in results):
        return Completed(name="Skipped", message="; ".join(f"{r.app}: {r.detail}"
                                                           for r in results)[:2000],
                         data=rows)
    return rows


def _report(inv: Inventory, results: list[core.AppResult], dry_run: bool) -> None:
    table = [r.row() for r in results]
    counts: dict[str, int] = {}
    for r in results:
        counts[r.status] = counts.get(r.status, 0) + 1
    description = "update: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    create_table_artifact(key=ARTIFACT_KEY, table=table, description=description)
    create_markdown_artifact(key=f"{ARTIFACT_KEY}-summary", markdown=summary(results),
                             description=description)
    if dry_run:
        return
    for r in results:
        kind = {"updated": "succeeded", "recovered": "succeeded",
                "rolled-back": "rolled_back", "failed": "failed"}.get(r.status, "skipped")
        emit_event(event=f"labkeeper.update.{kind}",
                   resource={"prefect.resource.id": f"labkeeper.app.{r.app}",
                             "prefect.resource.name": r.app, "labkeeper.lab": inv.lab.name},
                   payload=r.row())
        if r.status == "rolled-back":
            notify.notify(inv, "rollback", f"labkeeper: {r.app} update rolled back",
                          f"{redact(r.detail)}\nbefore: {core.fmt_versions(r.before)}\n"
                          f"attempted: {core.fmt_versions(r.attempted)}\n"
                          f"now: {core.fmt_versions(r.after)}\nlab: {inv.lab.name}")
    _record_metrics(inv, results)


def _record_metrics(inv: Inventory, results: list[core.AppResult]) -> None:
    now = time.time()
    samples: list[metrics.Sample] = []
    for r in results:
        if r.status == "skipped":
            continue
        labels = {"app": r.app}
        samples += [
            metrics.Sample("labkeeper_update_success", labels,
                           1 if r.status in ("updated", "recovered") else 0),
            metrics.Sample("labkeeper_update_rolled_back", labels,
                           1 if r.status == "rolled-back" else 0),
            metrics.Sample("labkeeper_update_last_run_timestamp_seconds", labels, now),
        ]
    if samples:
        try:
            metrics.record(inv.settings.state_dir, inv.settings.metrics.textfile, samples)
        except OSError as exc:
            get_run_logger().warning("metrics not recorded: %s", exc)


def summary(results: list[core.AppResult]) -> str:
    icon = {"updated": "✅", "recovered": "♻️", "rolled-back": "↩️", "failed": "❌",
            "skipped": "⏭️", "dry-run": "📝"}
    lines = ["# Application updates", "",
             "| | app | status | protection | before | attempted | after | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [icon.get(r.status, ""), r.app, r.status, r.protection or "-",
                 core.fmt_versions(r.before), core.fmt_versions(r.attempted),
                 core.fmt_versions(r.after), redact(r.detail)]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    for r in results:
        if r.plan:
            lines += ["", f"## {r.app}: commands", ""] + [f"    {p}" for p in r.plan]
        if r.removed:
            lines += ["", f"{r.app}: removed {', '.join(r.removed)}"]
    return "\n".join(lines)


# ====================================================================== CLI entry point


def run_update_cli(lab: Path, apps: list[str], *, dry_run: bool, force: bool) -> int:
    """``labkeeper update [APP...] [--dry-run] [--force]``: run the flow now.

    Exit 0 when every app updated (or was skipped / dry run), 2 when an app was rolled
    back (healthy on its old version), 1 on failure."""
    state: State = update_app_flow(apps=apps or None, lab=str(lab), dry_run=dry_run,
                                   force=force, return_state=True)
    rows: list[dict] = []
    if state.is_completed():
        result = state.result()
        rows = result if isinstance(result, list) else []
    else:
        exc = failure_of(state)
        rows = getattr(exc, "rows", [])
        print(f"update: {state.name}: {redact(state.message or str(exc))}")
    for r in rows:
        print(f"{r['status']:12} {r['app']:16} before {r['before']} → attempted "
              f"{r['attempted']} → now {r['after']}  {r['detail']}")
    if state.is_completed():
        return 0
    return 2 if state.name == "RolledBack" else 1


if __name__ == "__main__":
    update_app_flow()
