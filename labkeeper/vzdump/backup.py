"""One guest's vzdump and its retention, through :mod:`labkeeper.proxmox`.

:func:`backup_guest`: lock check, adopt a vzdump already running for it (a rerun after
a crash), start ``vzdump`` (``remove=0``: nothing is pruned before the new archive is
verified), wait with :func:`labkeeper.proxmox.wait_for_task`, parse the log, find and
verify the new archive. :func:`apply_retention`: Proxmox's own prune semantics.
"""

from __future__ import annotations

import contextlib
import posixpath
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from typing import Any

from labkeeper import proxmox as px
from labkeeper.errors import LabkeeperError, PermanentError, ServiceError
from labkeeper.inventory import PruneRetention, VzdumpJob
from labkeeper.vzdump.archive import (
    GuestBackup,
    RetentionResult,
    archive_filename,
    backed_up_since,
    parse_log,
    pick_new_archive,
    verify_archive,
)
from labkeeper.vzdump.plan import (
    NodeSlot,
    Target,
    VerificationFailed,
    VzdumpTimedOut,
    proportional_sleep,
    timeout_seconds,
)

# ====================================================================== operations


def running_vzdump(api: Any, node: str, vmid: int) -> px.Upid | None:
    """A vzdump of ``vmid`` already running on ``node`` (e.g. from a killed run)."""
    for task in px.list_tasks(api, node, vmid=vmid, typefilter="vzdump", source="active"):
        if task.id == str(vmid) and task.status is None:
            return px.parse_upid(task.upid)
    return None


def find_archive_path(api: Any, node: str, vmid: int, volid: str,
                      limit: int = 50) -> str | None:
    """Where ``volid`` lives on the node: from the log of the vzdump task that wrote it
    (``creating vzdump archive '/mnt/pve/x/dump/…'``)."""
    name = archive_filename(volid)
    for task in px.list_tasks(api, node, vmid=vmid, typefilter="vzdump", limit=limit):
        if task.status is None:
            continue
        path = parse_log(px.task_log(api, task.upid)).archive_path
        if path and posixpath.basename(path) == name:
            return path
    return None


def backup_guest(api: Any, job: VzdumpJob, target: Target, *, timeout: float | None = None,
                 poll_max: float = 5.0, since: float | None = None,
                 resume_since: float | None = None, slot: NodeSlot | None = None,
                 clock: Callable[[], float] = time.monotonic) -> GuestBackup:
    """Back up one guest and verify the archive.

    Returns a :class:`GuestBackup` with status ``ok``/``warning``, ``locked``
    when the guest holds a lock (the flow retries it later in the run), or
    ``skipped`` when ``since`` (epoch) is given and the guest already has an
    archive from then on (a rerun in the same schedule period: no duplicate).
    ``resume_since`` is for a retried attempt: a good archive made since then
    (by the earlier attempt, which failed after the vzdump) is this backup.
    ``slot`` is held only while the PVE task runs (see :class:`NodeSlot`).
    Raises :class:`VerificationFailed`, :class:`VzdumpTimedOut`,
    :class:`~labkeeper.proxmox.ProxmoxTaskError` (vzdump failed) or a
    :class:`~labkeeper.errors.ServiceError` (transient ones are retried).
    """
    started = clock()
    timeout = timeout if timeout is not None else timeout_seconds(job)
    try:
        return _backup_guest(api, job, target, timeout=timeout, poll_max=poll_max, since=since,
                             resume_since=resume_since, slot=slot, clock=clock,
                             started=started)
    finally:
        if slot is not None:
            slot.give_up()  # no-op when the slot was taken


def _backup_guest(api: Any, job: VzdumpJob, target: Target, *, timeout: float,
                  poll_max: float, since: float | None, resume_since: float | None,
                  slot: NodeSlot | None, clock: Callable[[], float],
                  started: float) -> GuestBackup:
    now = px.find_guest(api, target.vmid)
    if now is None:
        raise PermanentError(f"guest {target.vmid} is no longer in the cluster")
    base = GuestBackup(target.vmid, now.node, now.type, now.name or target.name, "locked")
    if now.lock:
        return replace(base, detail=f"locked ({now.lock})")
    node = now.node
    before = px.backups(api, node, job.storage, vmid=target.vmid)
    upid = running_vzdump(api, node, target.vmid)
    done = _done_since(job, base, before, since, resume_since)
    if upid is None and done is not None:
        if resume_since is not None and (done.ctime or 0) >= resume_since:
            return replace(base, status="ok", volid=done.volid, size=done.size,
                           ctime=done.ctime or 0, duration=clock() - started,
                           detail="the archive an earlier attempt of this task made")
        when = datetime.fromtimestamp(done.ctime or 0).strftime("%Y-%m-%d %H:%M")
        return replace(base, status="skipped", volid=done.volid, size=done.size,
                       ctime=done.ctime or 0,
                       detail=f"already backed up this schedule period ({when})")
    adopted = upid is not None
    with slot if slot is not None else contextlib.nullcontext():
        started = clock()  # the duration shown is the backup's, not the wait for a slot
        ran = _run_vzdump(api, job, base, upid, timeout=timeout, poll_max=poll_max)
    if isinstance(ran, GuestBackup):
        return ran  # locked
    # the PVE task has ended and the node's slot is free: verify off the critical path
    upid, result = ran
    return _verified(api, job, base, before, upid, result, adopted=adopted,
                     took=lambda: clock() - started)


def _done_since(job: VzdumpJob, base: GuestBackup, before: list[px.StorageVolume],
                since: float | None, resume_since: float | None) -> px.StorageVolume | None:
    """A good archive of the guest made since ``since`` / ``resume_since``, if any."""
    found = [t for t in (since, resume_since) if t is not None]
    done = backed_up_since(before, base.vmid, min(found)) if found else None
    if done is None:
        return None
    older = [b for b in before if (b.ctime or 0) < (done.ctime or 0)]
    if verify_archive(done, vmid=base.vmid, gtype=base.type, compress=job.compress,
                      previous=older[0] if older else None,
                      min_size_ratio=job.min_size_ratio, notes_template=job.notes_template,
                      guestname=base.name or f"{base.vmid}", node=base.node):
        return None  # not a good one: back up again
    return done


def _run_vzdump(api: Any, job: VzdumpJob, base: GuestBackup, upid: px.Upid | None, *,
                timeout: float, poll_max: float
                ) -> tuple[px.Upid, px.TaskResult] | GuestBackup:
    """Start the vzdump (unless ``upid`` is one already running) and wait for it; a
    locked guest comes back as its :class:`GuestBackup`."""
    vmid, node = base.vmid, base.node
    if upid is None:
        try:
            upid = px.vzdump(api, node, vmids=[vmid], mode=job.mode,
                             compress=job.compress, storage=job.storage,
                             notes_template=job.notes_template or None, remove=False)
        except px.GuestLocked as exc:
            return replace(base, detail=f"locked ({exc.lock})")
    try:
        return upid, px.wait_for_task(api, upid, timeout=timeout, max_poll=poll_max,
                                      sleep=proportional_sleep())
    except px.ProxmoxTaskTimeout as exc:
        try:
            px.stop_task(api, upid)
            stopped = "stopped it"
        except LabkeeperError as stop_exc:
            stopped = f"could not stop it: {stop_exc}"
        raise VzdumpTimedOut(f"vzdump of {vmid} on {node} ran past {timeout:g}s; "
                             f"{stopped} (UPID {upid})") from exc
    except px.ProxmoxTaskError as exc:
        lock = px.lock_name("\n".join([exc.exitstatus, *exc.log_tail]))
        if lock is not None:
            return replace(base, detail=f"locked ({lock})", upid=str(upid),
                           log_tail=exc.log_tail[-10:])
        raise


def _verified(api: Any, job: VzdumpJob, base: GuestBackup,
              before: list[px.StorageVolume], upid: px.Upid, result: px.TaskResult, *,
              adopted: bool, took: Callable[[], float]) -> GuestBackup:
    """The new archive, verified; raises :class:`VerificationFailed`."""
    vmid, node = base.vmid, base.node
    log = parse_log(result.log)
    after = px.backups(api, node, job.storage, vmid=vmid)
    new = pick_new_archive((b.volid for b in before), after, vmid, log.archive_path)
    problems = verify_archive(new, vmid=vmid, gtype=base.type, compress=job.compress,
                              previous=before[0] if before else None,
                              min_size_ratio=job.min_size_ratio,
                              notes_template=job.notes_template,
                              guestname=base.name or f"{vmid}", node=node, log=log)
    if log.skipped_external and vmid in log.skipped_external:
        problems.insert(0, "vzdump skipped the guest as external (it moved to another node)")
    if problems:
        raise VerificationFailed(
            f"vzdump of {vmid} on {node} finished {result.exitstatus} but the archive "
            f"failed verification: {'; '.join(problems)}", problems)
    assert new is not None
    detail = ("adopted a vzdump already running; " if adopted else "")
    if result.warnings:
        detail += f"{result.exitstatus}: " + "; ".join(log.warnings or result.tail(3))
    return replace(base, status="warning" if result.warnings else "ok", volid=new.volid,
                   size=new.size, duration=took(), upid=str(upid),
                   warnings=result.warnings, detail=detail.strip("; "),
                   archive_path=log.archive_path or "", log_tail=result.tail(10),
                   ctime=new.ctime or 0)


def apply_retention(api: Any, node: str, storage: str, vmid: int, gtype: px.GuestType,
                    retention: PruneRetention, *, dry_run: bool = False,
                    timeout: float = 600, poll_max: float = 2.0) -> RetentionResult:
    """Prune one guest's backups on ``storage`` with PVE's semantics (``prunebackups``).

    Lists the marks first (the dry run); removes only volumes marked ``remove``
    (PVE never marks a protected backup ``remove``), then checks they are gone.
    """
    policy = retention.as_pve()
    marks = px.prune_dry_run(api, node, storage, prune_backups=policy, vmid=vmid, gtype=gtype)
    remove = tuple(sorted(m.volid for m in marks if m.mark == "remove"))
    kept = sum(1 for m in marks if m.mark == "keep")
    protected = sum(1 for m in marks if m.mark == "protected")
    result = RetentionResult(vmid, policy, dry_run, remove, kept, protected)
    if dry_run or not remove:
        return result
    upid = px.prune_backups(api, node, storage, vmid=vmid, prune_backups=policy, gtype=gtype)
    px.wait_for_task(api, upid, timeout=timeout, max_poll=poll_max,
                     sleep=proportional_sleep())
    left = {b.volid for b in px.backups(api, node, storage, vmid=vmid)}
    still = [v for v in remove if v in left]
    if still:
        raise ServiceError(f"prune of {vmid} on {node}/{storage} left {still}",
                           service="proxmox", transient=True)
    return replace(result, removed=remove)
