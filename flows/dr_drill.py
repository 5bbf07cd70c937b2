"""Disaster-recovery drills: restore for real, verify, measure RTO and RPO.

The runbook a person would follow, per drill target (``all``: every enabled drill):

1. **Database**: restore the latest dump (and its manifest) into a scratch
   ``labkeeper_drill_*`` database on the drill server, streaming from restic;
   verify every table's row count against the manifest, the smoke queries and the
   globals dump; measure RPO (age of the backup) and RTO (restore → verified);
   drop the scratch database (kept only on failure with ``keep_on_failure``).
2. **Guest**: first destroy the marked scratch copies that drills which died left
   behind; restore the newest vzdump archive to a scratch VMID with its network
   detached (or on the isolated drill bridge), start it, check it runs (and, where
   the inventory says so, log in over SSH or run a probe against the copy),
   measure, destroy it.
3. **Repository**: ``restic check --read-data-subset n/N`` (rotating) and one
   random snapshot restored and compared byte for byte.
4. **Path set** (``paths:<host>/<set>``): a random sample of files of the latest
   snapshot restored and compared by SHA-256 with the files on the host (SSH);
   files changed since the backup are reported, not failed.
5. **PITR** (``pitr:<server>``, every server of the ``pitr:`` section): the same
   restores as the ``pitr_drill`` flow (a random moment, the newest, and each newest
   dump's WAL LSN with its row counts compared with the manifest) in scratch clusters;
   RTO and RPO against the server's ``objectives``.

Leaves a markdown artifact ``dr-drill`` (every drill, RPO/RTO against objectives,
what was verified) and one table artifact per target (``drill-<kind>-<name>``, so
the Prefect UI shows each target's history over runs); emits
``labkeeper.drill.passed`` / ``labkeeper.drill.failed`` and
``labkeeper.drill.objective_breached``; records ``labkeeper_drill_*`` metrics;
notifies the ``drill`` subscribers of failed drills. A failed drill or a breached
objective fails the run (the flow hooks ping ``dr_drill`` and notify on failure).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from labkeeper import drill as core
from labkeeper import metrics, notify
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.secrets import redact
from tasks import drill as drill_tasks
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "dr-drill"


def task_for(kind: str) -> Any:
    """The Prefect task of a drill kind."""
    return drill_tasks.BY_KIND[kind]


class DrillRunFailed(RunFailed):
    """At least one drill failed or breached an objective."""

    notify_event = "drill"
    """The flow sent the "drill" message itself (tasks/hooks.py skips "run failed")."""


def artifact_key(kind: str, name: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"
    short = {"database": "db", "guest": "guest", "repository": "repo", "paths": "paths",
             "pitr": "pitr"}[kind]
    return f"drill-{short}-{slug}"[:100]


def _resource(inv: Inventory, result: core.DrillResult) -> dict[str, str]:
    if result.kind == "database":
        rid = f"labkeeper.database.{inv.database_server(result.target)}/{result.target}"
    elif result.kind == "guest":
        rid = f"labkeeper.guest.{inv.guest(result.target).vmid}"
    elif result.kind == "paths":
        rid = f"labkeeper.paths.{result.target}"
    elif result.kind == "pitr":
        rid = f"labkeeper.pitr.{result.target}"
    else:
        rid = f"labkeeper.repository.{result.target}"
    return {"prefect.resource.id": rid, "prefect.resource.name": result.target,
            "labkeeper.lab": inv.lab.name, "labkeeper.drill.kind": result.kind}


def _emit(inv: Inventory, result: core.DrillResult) -> None:
    resource = _resource(inv, result)
    payload = {k: v for k, v in result.row().items()}
    payload["rpo_s"] = result.rpo_s
    payload["rto_s"] = result.rto_s
    emit_event(event=f"labkeeper.drill.{'passed' if result.passed else 'failed'}",
               resource=resource, payload=payload)
    if result.breaches:
        emit_event(event="labkeeper.drill.objective_breached", resource=resource,
                   payload={**payload, "breaches": result.breaches})


def _record_metrics(inv: Inventory, results: list[core.DrillResult]) -> None:
    now = time.time()
    samples: list[metrics.Sample] = []
    for r in results:
        labels = {"kind": r.kind, "target": r.target}
        samples.append(metrics.Sample("labkeeper_drill_success", labels, 1 if r.passed else 0))
        samples.append(metrics.Sample("labkeeper_drill_last_run_timestamp_seconds", labels,
                                      now))
        if r.rto_s is not None:
            samples.append(metrics.Sample("labkeeper_drill_rto_seconds", labels, r.rto_s))
        if r.rpo_s is not None:
            samples.append(metrics.Sample("labkeeper_drill_rpo_seconds", labels, r.rpo_s))
    if samples:
        try:
            metrics.record(inv.settings.state_dir, inv.settings.metrics.textfile, samples)
        except OSError as exc:
            get_run_logger().warning("metrics not recorded: %s", exc)


def _result_of(kind: str, name: str, state: Any) -> core.DrillResult:
    if state.is_completed():
        return state.result()
    exc = failure_of(state)
    carried = getattr(exc, "result", None)
    if isinstance(carried, core.DrillResult):
        return carried
    result = core.DrillResult(kind, name)
    result.fail(f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name))
    return result


@flow(name="dr_drill", log_prints=False, timeout_seconds=24 * 3600, **hooks("dr_drill"))
def dr_drill_flow(target: str = "all", lab: str | None = None) -> list[dict]:
    """Run the disaster-recovery drills of ``target``: ``all`` (every enabled drill),
    ``db:NAME``, ``guest:NAME``, ``repository[:NAME]``, ``paths[:HOST/SET]`` or a bare
    name.

    Args:
        target: Which drills: all (every enabled drill), db:NAME, guest:NAME,
            repository or repository:NAME, paths or paths:HOST/SET, or a bare name.
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    guest_poll = inv.settings.tuning.drill_guest_poll
    plan = core.plan_targets(inv, target)
    logger.info("dr_drill %s: %d drill(s): %s", target, len(plan),
                ", ".join(f"{k}:{n}" for k, n in plan) or "none")
    started = time.monotonic()
    results: list[core.DrillResult] = []
    for kind, name in plan:
        task = task_for(kind)
        extra = {"poll": guest_poll} if kind == "guest" else {}
        state = task(inv, name, return_state=True, **extra)
        result = _result_of(kind, name, state)
        results.append(result)
        (logger.info if result.passed else logger.error)(
            "%s %s: %s — %s", result.status.upper(), result.label, result.row()["rto"],
            result.summary())
        for note in result.notes:
            logger.info("%s: %s", result.label, redact(note))
        _emit(inv, result)
        create_table_artifact(key=artifact_key(kind, name), table=[result.row()],
                              description=f"DR drill {result.label}: {result.status}")
    rows = [r.row() for r in results]
    elapsed = time.monotonic() - started
    failed = [r for r in results if not r.passed]
    create_markdown_artifact(key=ARTIFACT_KEY, markdown=summary_markdown(inv, results, elapsed),
                             description=f"DR drills of {inv.lab.name}: "
                                         f"{len(results) - len(failed)} passed / "
                                         f"{len(failed)} failed")
    _record_metrics(inv, results)
    if failed:
        body = "\n".join(f"{r.label}: {r.summary()}" for r in failed)
        notify.notify(inv, "drill", f"labkeeper: {len(failed)} DR drill(s) failed",
                      f"{body}\nlab: {inv.lab.name}")
        raise DrillRunFailed(f"{len(failed)} of {len(results)} drills failed: "
                             + "; ".join(f"{r.label}: {r.summary()}" for r in failed)[:4000],
                             rows)
    if not plan:
        logger.warning("dr_drill %s: no drill is enabled in the inventory", target)
    return rows


def summary_markdown(inv: Inventory, results: list[core.DrillResult], elapsed: float) -> str:
    icon = {"passed": "✅", "failed": "❌"}
    lines = [f"# DR drills of {inv.lab.name}", "",
             f"{len(results)} drill(s) in {elapsed:.1f} s", "",
             "| | drill | target | RPO / objective | RTO / objective | source | verified |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        row = r.row()
        lines.append(f"| {icon[r.status]} | {r.kind} | {r.target} | {row['rpo']} / "
                     f"{row['rpo objective']} | {row['rto']} / {row['rto objective']} | "
                     f"{r.source} | {row['checks']} |")
    for r in results:
        lines += ["", f"## {icon[r.status]} {r.label}", ""]
        if r.error:
            lines.append(f"**Error:** {redact(r.error)}")
            lines.append("")
        for b in r.breaches:
            lines.append(f"**Objective breached:** {b}")
        if r.breaches:
            lines.append("")
        for c in r.checks:
            detail = redact(c.detail).replace("|", "\\|")
            lines.append(f"- {'✅' if c.ok else '❌'} {c.name}: {detail}")
        if r.kept:
            lines.append(f"- ⚠️ scratch copy kept: {r.kept}")
        for n in r.notes:
            lines.append(f"- {redact(n)}")
    return "\n".join(lines)


def run_drill_cli(lab: Path, target: str | None) -> int:
    """``labkeeper drill run [TARGET]``: run the drills now, print them; 0 when all passed."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state = dr_drill_flow(target=target or "all", lab=str(lab), return_state=True)
    rows: list[dict[str, Any]] = []
    if state.is_completed():
        rows = state.result()
    else:
        exc = failure_of(state)
        rows = getattr(exc, "rows", []) or []
        if not rows:
            console.print(f"[red]drill failed:[/red] {redact(str(exc) if exc else state.name)}",
                          markup=True)
    if rows:
        cols = ("drill", "target", "status", "rpo", "rpo objective", "rto", "rto objective",
                "checks", "source")
        table = Table(title="DR drills")
        for col in cols:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*(str(r[c]) for c in cols))
        console.print(table)
        for r in rows:
            if r["status"] != "passed":
                console.print(f"{r['drill']}:{r['target']}: {r['detail']}", markup=False)
            if r.get("kept"):
                console.print(f"{r['drill']}:{r['target']}: kept {r['kept']}", markup=False)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    dr_drill_flow()
