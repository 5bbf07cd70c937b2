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

import contextvars
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.utilities.annotations import quote

from labkeeper import metrics
from labkeeper import vzdump as core
from labkeeper.errors import ConfigError
from labkeeper.inventory import Inventory, PruneRetention, Selection, VzdumpJob, load_inventory
from labkeeper.secrets import redact
from tasks import vzdump as vt
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "vzdump"
ADHOC_RETENTION = ("ad-hoc run (no job): retention is not applied — no archive is pruned; "
                   "run a job to apply its retention policy")


class VzdumpRunFailed(RunFailed):
    """At least one guest failed."""


def job_for(inv: Inventory, job: str | None, selection: dict[str, Any] | None,
            storage: str | None) -> VzdumpJob:
    """The inventory job (optionally with an ad-hoc selection), or an ad-hoc job."""
    if job is not None:
        base = inv.vzdump_job(job)
        if selection is None and storage is None:
            return base
        update: dict[str, Any] = {}
        if selection is not None:
            update["selection"] = Selection.model_validate(selection)
        if storage is not None:
            update["storage"] = storage
        return base.model_copy(update=update)
    if selection is None or storage is None:
        raise ConfigError("give a vzdump job name, or an ad-hoc selection and a storage")
    return VzdumpJob(name="ad-hoc", selection=Selection.model_validate(selection),
                     storage=storage, retention=PruneRetention(keep_all=True),
                     schedule="0 0 * * *")


def _state_error(state: Any) -> str:
    exc = failure_of(state)
    return redact(f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name))


@dataclass
class _NodeQueue:
    """One node's guests to back up, its vzdump slots and the guests still in flight.

    A feeder thread per node takes guests in order and submits one task run per
    guest; the next is submitted as soon as the previous one holds a slot (or
    ended without needing one), so it is ready — Prefect task run created, lock
    and "already done" checks made — and starts its vzdump the moment a slot
    frees. ``active`` counts guests taken and not yet judged by the flow (a
    locked one may still come back via :meth:`defer`).
    """

    node: str
    pending: deque[tuple[core.Target, int]]
    slots: threading.Semaphore
    deferred: list[tuple[float, core.Target, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0

    def take(self) -> tuple[core.Target, int] | float | None:
        """The next guest, seconds to wait (a deferred guest is not due yet, or a
        guest in flight may still be deferred), or None when the node is done."""
        with self.lock:
            if self.pending:
                self.active += 1
                return self.pending.popleft()
            if self.deferred:
                self.deferred.sort(key=lambda d: d[0])
                due, target, attempt = self.deferred[0]
                wait = due - time.monotonic()
                if wait <= 0:
                    self.deferred.pop(0)
                    self.active += 1
                    return target, attempt
                return min(0.2, wait)
            return None if self.active == 0 else 0.05

    def done(self) -> None:
        with self.lock:
            self.active -= 1

    def defer(self, target: core.Target, attempt: int, delay: float) -> None:
        with self.lock:
            self.deferred.append((time.monotonic() + delay, target, attempt))


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
    tuning = inv.settings.tuning
    lock_retries, lock_retry_delay = tuning.vzdump_lock_retries, tuning.vzdump_lock_retry_delay
    poll_max = tuning.vzdump_poll_max
    spec = job_for(inv, job, selection, storage)
    adhoc = job is None
    started = time.monotonic()
    # the inventory and the job go to every task run as they are: quote() keeps Prefect
    # from walking the whole inventory model for each of them (tens of ms per task run)
    qinv, qspec = quote(inv), quote(spec)
    resolved: core.Resolved = vt.select_guests(qinv, qspec)
    since = None
    if not force and job is not None:
        since = core.period_start(spec.schedule, inv.lab.timezone).timestamp()
    rows: dict[int, core.Row] = {}
    for t in resolved.targets:
        rows[t.vmid] = core.Row(t.name or str(t.vmid), t.vmid, t.node)
    for vmid in resolved.missing:
        rows[vmid] = core.Row(str(vmid), vmid, "-", status="failed",
                              detail="selected but not in the cluster")
    warnings = list(resolved.warnings)
    if adhoc:
        warnings.append(ADHOC_RETENTION)
    for w in warnings:
        logger.warning("vzdump %s: %s", spec.name, w)
    queues = core.node_queues(resolved.targets)
    logger.info("vzdump %s: %d guest(s) on %d node(s), max %d per node, storage %s",
                spec.name, len(resolved.targets), len(queues), spec.max_per_node, spec.storage)

    vz_timeout = task_timeout if task_timeout is not None else core.timeout_seconds(spec)
    # a task run waits for a slot at most as long as the vzdump before it may take
    backup_task = vt.backup_guest.with_options(timeout_seconds=2 * vz_timeout + 900)
    finished: queue.Queue[tuple[_NodeQueue, core.Target, int, Any]] = queue.Queue()

    def feeder(nq: _NodeQueue) -> None:
        while True:
            item = nq.take()
            if item is None:
                return
            if isinstance(item, float):
                time.sleep(item)
                continue
            target, attempt = item
            slot = core.NodeSlot(nq.node, nq.slots, wait_timeout=vz_timeout + 600)
            try:
                fut = backup_task.submit(qinv, qspec, target, attempt, since, poll_max,
                                         vz_timeout, slot)
            except Exception as exc:  # Prefect could not even start it: that guest failed
                finished.put((nq, target, attempt, exc))
                continue

            def _finished(f: Any, nq: _NodeQueue = nq, target: core.Target = target,
                          attempt: int = attempt, slot: core.NodeSlot = slot) -> None:
                slot.give_up()
                finished.put((nq, target, attempt, f))

            fut.add_done_callback(_finished)
            slot.handoff.wait()

    post: list[tuple[int, str, Any]] = []

    def judge(nq: _NodeQueue, target: core.Target, attempt: int, fut: Any) -> None:
        """A guest's backup task run ended: record it; locked → later; good → retention
        and off-site copy as task runs of their own."""
        row = rows[target.vmid]
        if isinstance(fut, Exception):
            row.status, row.detail = "failed", redact(f"{type(fut).__name__}: {fut}")
            return
        fut.wait()  # done already; this records its final state on the future
        state = fut.state
        if not state.is_completed():
            row.status, row.detail = "failed", _state_error(state)
            return
        res: core.GuestBackup = state.result()
        row.node = res.node
        if res.status == "locked":
            if attempt <= lock_retries:
                row.status, row.detail = "pending", f"try {attempt}: {res.detail}"
                nq.defer(target, attempt + 1, lock_retry_delay)
            else:
                row.status = "failed"
                row.detail = f"still {res.detail} after {attempt} tries"
            return
        row.status, row.archive, row.size = res.status, res.volid, res.size
        row.duration_s, row.detail = res.duration, res.detail
        if adhoc:
            row.pruned = "skipped (ad-hoc run)"
        else:
            post.append((res.vmid, "retention", vt.apply_retention.submit(
                qinv, qspec, res.node, res.vmid, res.type, dry_run_retention)))
        if spec.offsite is not None:
            post.append((res.vmid, "offsite", vt.copy_offsite.submit(qinv, qspec, res,
                                                                     dry_run_retention)))

    feeders: list[threading.Thread] = []
    for node, targets in queues.items():
        nq = _NodeQueue(node, deque((t, 1) for t in targets),
                        threading.BoundedSemaphore(spec.max_per_node))
        ctx = contextvars.copy_context()
        th = threading.Thread(target=ctx.run, args=(feeder, nq), name=f"vzdump-{node}",
                              daemon=True)
        th.start()
        feeders.append(th)
    while any(th.is_alive() for th in feeders) or not finished.empty():
        try:
            nq, target, attempt, fut = finished.get(timeout=0.1)
        except queue.Empty:
            continue
        try:
            judge(nq, target, attempt, fut)
        finally:
            nq.done()

    for vmid, kind, fut in post:
        fut.wait()
        row = rows[vmid]
        state = fut.state
        if kind == "retention":
            if state.is_completed():
                r: core.RetentionResult = fut.result()
                row.pruned = len(r.remove) if not r.dry_run else f"{len(r.remove)} (dry run)"
            else:
                row.pruned = "failed"
                row.status = "failed"
                row.detail = f"{row.detail}; retention: {_state_error(state)}".strip("; ")
        else:
            if state.is_completed():
                row.offsite = fut.result().text()
            else:
                row.offsite = "failed"
                row.status = "failed"
                row.detail = f"{row.detail}; offsite: {_state_error(state)}".strip("; ")
    if spec.offsite is None:
        for row in rows.values():
            row.offsite = "-"

    table = [r.as_dict() for r in sorted(rows.values(), key=lambda r: (r.node, r.vmid))]
    failed = [r for r in rows.values() if r.status not in ("ok", "warning", "skipped")]
    elapsed = time.monotonic() - started
    counts = {s: sum(1 for r in rows.values() if r.status == s)
              for s in ("ok", "warning", "skipped")}
    description = (f"vzdump {spec.name}: {counts['ok']} ok / {counts['warning']} with "
                   f"warnings / {counts['skipped']} already done / {len(failed)} failed")
    if adhoc:
        description += "; retention not applied (ad-hoc run)"
    if not table:
        table = [{"guest": "-", "vmid": 0, "node": "-", "archive": "", "size": 0,
                  "duration s": 0, "status": "warning", "pruned": "", "offsite": "",
                  "detail": "; ".join(resolved.warnings)}]
    create_table_artifact(key=ARTIFACT_KEY, table=table, description=description)
    create_markdown_artifact(key=f"{ARTIFACT_KEY}-summary",
                             markdown=_summary(spec, table, tuple(warnings), elapsed,
                                               adhoc=adhoc))
    for r in rows.values():
        _emit(inv, spec, r)
    _record_metrics(inv, spec, rows.values())
    for r in sorted(rows.values(), key=lambda r: r.vmid):
        log = logger.error if r in failed else logger.info
        log("%-6s %-16s %-5s %-8s %s %s", r.vmid, r.guest[:16], r.node, r.status, r.archive,
            redact(r.detail))
    if failed:
        names = ", ".join(f"{r.vmid}" for r in sorted(failed, key=lambda r: r.vmid))
        raise VzdumpRunFailed(f"{len(failed)} of {len(rows)} guest backups failed: {names}",
                              table)
    return table


def _emit(inv: Inventory, job: VzdumpJob, row: core.Row) -> None:
    ok = row.status in ("ok", "warning", "skipped")
    emit_event(
        event=f"labkeeper.vzdump.{'succeeded' if ok else 'failed'}",
        resource={"prefect.resource.id": f"labkeeper.guest.{row.vmid}",
                  "prefect.resource.name": row.guest, "labkeeper.lab": inv.lab.name},
        payload={"job": job.name, **row.as_dict()},
    )


def _record_metrics(inv: Inventory, job: VzdumpJob, rows: Any) -> None:
    now = time.time()
    samples: list[metrics.Sample] = []
    for r in rows:
        labels = {"job": job.name, "guest": r.guest, "vmid": str(r.vmid)}
        ok = r.status in ("ok", "warning", "skipped")
        samples.append(metrics.Sample("labkeeper_vzdump_success", labels, 1 if ok else 0))
        if ok and r.status != "skipped":
            samples.append(metrics.Sample("labkeeper_vzdump_last_success_timestamp_seconds",
                                          labels, now))
        if ok:
            samples.append(metrics.Sample("labkeeper_vzdump_archive_bytes", labels, r.size))
    if samples:
        try:
            metrics.record(inv.settings.state_dir, inv.settings.metrics.textfile, samples)
        except OSError as exc:
            get_run_logger().warning("metrics not recorded: %s", exc)


def _summary(job: VzdumpJob, table: list[dict], warnings: tuple[str, ...],
             elapsed: float, *, adhoc: bool = False) -> str:
    icon = {"ok": "✅", "warning": "⚠️", "skipped": "↩️", "failed": "❌"}
    retention = ("**not applied** (ad-hoc run)" if adhoc
                 else f"`{job.retention.as_pve()}`")
    lines = [f"# vzdump {job.name}", "",
             f"{len(table)} guest(s) in {elapsed:.1f} s — storage `{job.storage}`, mode "
             f"{job.mode}, retention {retention}", "",
             "| | guest | vmid | node | archive | size | s | pruned | offsite | detail |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        detail = str(r["detail"]).replace("|", "\\|")
        lines.append(f"| {icon.get(r['status'], '')} | {r['guest']} | {r['vmid']} | {r['node']} "
                     f"| {r['archive']} | {r['size']} | {r['duration s']} | {r['pruned']} "
                     f"| {r['offsite']} | {detail} |")
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {redact(w)}" for w in warnings]
    return "\n".join(lines)


# ====================================================================== CLI entry points


def run_vzdump_cli(lab: Path, job: str, *, force: bool = False,
                   dry_run_retention: bool = False) -> int:
    """``labkeeper vzdump run JOB``: run the flow now; 0 when every guest is good."""
    state = vzdump_flow(job=job, lab=str(lab), force=force,
                        dry_run_retention=dry_run_retention, return_state=True)
    rows: list[dict] = []
    if state.is_completed():
        rows = state.result()
    else:
        exc = failure_of(state)
        rows = getattr(exc, "rows", [])
        print(f"vzdump {job}: {redact(str(exc)) if exc else state.name}")
    for r in rows:
        print(f"{r['status']:8} {r['vmid']:>6} {r['node']:6} {r['archive'] or '-'} "
              f"{r['detail']}")
    return 0 if state.is_completed() else 1


def sync_jobs_cli(lab: Path, apply: bool) -> int:
    """``labkeeper vzdump sync-jobs [--apply]``: show (and apply) the native job plan."""
    from labkeeper import proxmox as px

    inv = load_inventory(str(lab))
    api = vt.api_for(inv)
    plan = core.plan_native_jobs(inv.vzdump_jobs, px.list_backup_jobs(api),
                                 px.list_guests(api), core.inventory_vmids(inv))
    if not plan:
        print("no vzdump job is marked native: true; nothing to sync")
        return 0
    for change in plan:
        print(change.line())
    changes = [c for c in plan if c.action != "unchanged"]
    if not apply:
        if changes:
            print(f"{len(changes)} change(s); run again with --apply to make them")
        return 0
    for line in core.apply_native_plan(api, changes):
        print(f"done: {line}")
    return 0


if __name__ == "__main__":
    vzdump_flow()
