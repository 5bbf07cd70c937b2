"""Guest backups with vzdump: select, back up node by node, verify, prune, copy off-site.

The runbook a person would follow, per run of a vzdump job:

1. resolve the job's selection against the cluster *now* (tags, pools, nodes);
   nothing matched → a warning in the artifact, not a silent success;
2. per node, at most ``max_per_node`` vzdumps at a time, nodes in parallel; one
   Prefect task run per guest (``vzdump-<vmid>-<node>-try<n>``); a locked or
   migrating guest goes to the back of its node's queue and is tried again later
   in the run (``settings.tuning.vzdump_lock_retries`` times), then reported;
3. each backup waits on its UPID, reads the log and verifies the new archive
   (``WARNINGS: n`` is success with warnings). The node's slot is held only while
   the PVE task runs: the next guest's task run is already prepared and starts
   its vzdump the moment the previous one ends, while that one is verified;
4. retention per guest (PVE's prunebackups; ``dry_run`` lists only; an ad-hoc
   run without a job prunes nothing and says so) and, for a job with
   ``offsite``, the copy (SFTP → S3 multipart, or SFTP → SFTP to an SSH host)
   and off-site retention — task runs of their own, off the node's critical path;
5. a table artifact, an event per guest, metrics (pings and notifications come
   from the flow hooks); the
   run fails at the end if any guest failed.

A rerun in the same schedule period (after a crash) skips guests that already
have a verified archive since the period began (``force`` backs up anyway) and
still completes their retention and off-site copy.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.utilities.annotations import quote

from labkeeper import vzdump as core
from labkeeper.inventory import load_inventory
from labkeeper.run_report.vzdump import VzdumpReport
from tasks import vzdump as vt
from tasks.common import RunFailed, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "vzdump"


class VzdumpRunFailed(RunFailed):
    """At least one guest failed."""


@flow(name="vzdump", log_prints=False, timeout_seconds=24 * 3600, **hooks("vzdump"))
def vzdump_flow(job: str | None = None, lab: str | None = None,
                selection: dict[str, Any] | None = None, storage: str | None = None,
                dry_run_retention: bool = False, force: bool = False,
                task_timeout: float | None = None) -> list[dict]:
    """Back up the guests of vzdump job ``job`` (or an ad-hoc ``selection`` to ``storage``).

    An ad-hoc run (no ``job``) has no retention policy: it prunes nothing, and says so.
    Locked guests are tried again (``settings.tuning.vzdump_lock_retries``, every
    ``vzdump_lock_retry_delay`` s); Proxmox tasks are polled at most every
    ``vzdump_poll_max`` s.

    Args:
        job: The vzdump job to run (its name in the inventory's vzdump_jobs). Empty:
            an ad-hoc backup of the selection below.
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        selection: Ad-hoc only: which guests, as a vzdump job's selection
            (e.g. {"guests": ["web"]} or {"tags": ["critical"]}).
        storage: Ad-hoc only: the Proxmox backup storage to write to.
        dry_run_retention: List what retention would remove, without removing it.
        force: Also back up guests that already have an archive from this schedule
            period.
        task_timeout: Seconds to wait for each guest's backup in this run (empty: the
            job's timeout_minutes).
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    spec = core.job_for(inv, job, selection, storage)
    adhoc = job is None
    started = time.monotonic()
    # the inventory and the job go to every task run as they are: quote() keeps Prefect
    # from walking the whole inventory model for each of them (tens of ms per task run)
    qinv, qspec = quote(inv), quote(spec)
    resolved: core.Resolved = vt.select_guests(qinv, qspec)
    since = None
    if not force and job is not None:
        since = core.period_start(spec.schedule, inv.lab.timezone).timestamp()
    report = VzdumpReport(inv, ARTIFACT_KEY, logger, spec, resolved, adhoc=adhoc,
                          started=started)
    queues = core.node_queues(resolved.targets)
    logger.info("vzdump %s: %d guest(s) on %d node(s), max %d per node, storage %s",
                spec.name, len(resolved.targets), len(queues), spec.max_per_node, spec.storage)

    vz_timeout = task_timeout if task_timeout is not None else core.timeout_seconds(spec)
    _back_up(qinv, qspec, report, queues, since=since, vz_timeout=vz_timeout,
             dry_run_retention=dry_run_retention)
    table, failed = report.finish()
    if failed:
        names = ", ".join(f"{r.vmid}" for r in sorted(failed, key=lambda r: r.vmid))
        raise VzdumpRunFailed(f"{len(failed)} of {len(report.rows)} guest backups failed: "
                              f"{names}", table)
    return table


def _back_up(qinv: Any, qspec: Any, report: VzdumpReport,
             queues: dict[str, list[core.Target]], *, since: float | None, vz_timeout: float,
             dry_run_retention: bool) -> None:
    """Every guest node by node (:func:`labkeeper.vzdump.run_per_node`), one task run
    each; then each good one's retention and off-site copy, as task runs of their own."""
    spec, tuning = report.job, report.inv.settings.tuning
    # a task run waits for a slot at most as long as the vzdump before it may take
    backup_task = vt.backup_guest.with_options(timeout_seconds=2 * vz_timeout + 900)
    after: list[tuple[int, str, Any]] = []  # retention and off-site copies, in flight

    def back_up(target: core.Target, attempt: int, slot: core.NodeSlot) -> Any:
        return backup_task.submit(qinv, qspec, target, attempt, since, tuning.vzdump_poll_max,
                                  vz_timeout, slot)

    def judge(target: core.Target, attempt: int, outcome: Any) -> float | None:
        """Record the guest; a locked one again later; a good one: retention and the
        off-site copy."""
        retry = attempt <= tuning.vzdump_lock_retries
        res = report.backup_ended(target, attempt, outcome, retry)
        if res is None:
            return None
        if res.status == "locked":
            return tuning.vzdump_lock_retry_delay if retry else None
        after.extend(_after_backup(qinv, qspec, res, retention=not report.adhoc,
                                   offsite=spec.offsite is not None, dry_run=dry_run_retention))
        return None

    core.run_per_node(queues, spec.max_per_node, submit=back_up, judge=judge,
                      slot_wait=vz_timeout + 600)
    for vmid, kind, fut in after:
        report.after_backup_ended(vmid, kind, fut)


def _after_backup(qinv: Any, qspec: Any, res: core.GuestBackup, *, retention: bool,
                  offsite: bool, dry_run: bool) -> list[tuple[int, str, Any]]:
    """Submit a good backup's retention and off-site copy (as the job has them)."""
    started = []
    if retention:
        started.append((res.vmid, "retention", vt.apply_retention.submit(
            qinv, qspec, res.node, res.vmid, res.type, dry_run)))
    if offsite:
        started.append((res.vmid, "offsite", vt.copy_offsite.submit(qinv, qspec, res,
                                                                     dry_run)))
    return started


if __name__ == "__main__":
    vzdump_flow()
