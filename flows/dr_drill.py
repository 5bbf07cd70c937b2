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

from typing import Any

from prefect import flow, get_run_logger

from labkeeper import drill as core
from labkeeper import notify
from labkeeper.inventory import load_inventory
from labkeeper.run_report.drill import DrillReport
from labkeeper.run_report.drill import artifact_key as artifact_key  # tests import it here
from tasks import drill as drill_tasks
from tasks.common import RunFailed, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "dr-drill"


def task_for(kind: str) -> Any:
    """The Prefect task of a drill kind."""
    return drill_tasks.BY_KIND[kind]


class DrillRunFailed(RunFailed):
    """At least one drill failed or breached an objective."""

    notify_event = "drill"
    """The flow sent the "drill" message itself (tasks/hooks.py skips "run failed")."""


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
    report = DrillReport(inv, ARTIFACT_KEY, logger)
    for kind, name in plan:
        extra = {"poll": guest_poll} if kind == "guest" else {}
        report.add(kind, name, task_for(kind)(inv, name, return_state=True, **extra))
    failed = report.finish()
    rows = [r.row() for r in report.results]
    if failed:
        body = "\n".join(f"{r.label}: {r.summary()}" for r in failed)
        notify.notify(inv, "drill", f"labkeeper: {len(failed)} DR drill(s) failed",
                      f"{body}\nlab: {inv.lab.name}")
        raise DrillRunFailed(f"{len(failed)} of {len(report.results)} drills failed: "
                             + "; ".join(f"{r.label}: {r.summary()}" for r in failed)[:4000],
                             rows)
    if not plan:
        logger.warning("dr_drill %s: no drill is enabled in the inventory", target)
    return rows


if __name__ == "__main__":
    dr_drill_flow()
