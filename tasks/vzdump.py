"""vzdump as Prefect tasks: one task run per guest for the backup, its retention and its
off-site copy (each with its own state, retries and history in the UI)."""

from __future__ import annotations

import math
import threading
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from labkeeper import b2, offsite
from labkeeper import progress as progress_mod
from labkeeper import proxmox as px
from labkeeper import vzdump as core
from labkeeper.errors import ConfigError, PermanentError
from labkeeper.inventory import Inventory, VzdumpJob
from labkeeper.ssh import SshPool
from tasks.common import RETRY

_api_cache = threading.local()


def api_for(inv: Inventory) -> Any:
    """The Proxmox API client for ``inv``: one per thread and inventory object, so the
    task runs of a flow run on a worker thread reuse its session (and its TLS
    connection) instead of connecting for each guest."""
    cached = getattr(_api_cache, "entry", None)
    if cached is not None and inv.proxmox is not None and cached[0] is inv.proxmox:
        return cached[1]
    api = px.connect_lab(inv.proxmox)
    _api_cache.entry = (inv.proxmox, api)
    return api


@task(name="vzdump-select", task_run_name="select-{job.name}", timeout_seconds=300,
      cache_policy=NO_CACHE, **RETRY)
def select_guests(inv: Inventory, job: VzdumpJob) -> core.Resolved:
    """Resolve the job's selection against /cluster/resources now."""
    return core.resolve(api_for(inv), inv, job)


_first_try: dict[uuid.UUID, float] = {}
_first_try_lock = threading.Lock()


def _resume_since() -> float | None:
    """On a retried attempt of this task run: when the first attempt began (an archive
    made since then is this backup — the retry must not make a second one)."""
    ctx = TaskRunContext.get()
    if ctx is None:
        return None
    with _first_try_lock:
        first = _first_try.get(ctx.task_run.id)
        if first is None:
            _first_try[ctx.task_run.id] = time.time()
            return None
    return float(math.floor(first))


def _forget_first_try() -> None:
    ctx = TaskRunContext.get()
    if ctx is not None:
        with _first_try_lock:
            _first_try.pop(ctx.task_run.id, None)


@task(name="vzdump-guest", task_run_name="vzdump-{target.vmid}-{target.node}-try{attempt}",
      timeout_seconds=4 * 3600, cache_policy=NO_CACHE, **RETRY)
def backup_guest(inv: Inventory, job: VzdumpJob, target: core.Target, attempt: int = 1,
                 since: float | None = None, poll_max: float = 5.0,
                 timeout: float | None = None,
                 slot: core.NodeSlot | None = None) -> core.GuestBackup:
    """vzdump one guest, wait for it, verify the new archive (or report it locked).

    The node's ``slot`` is held only while the PVE task runs (the node's next guest
    starts as soon as it ends); verification happens after, in this same task."""
    logger = get_run_logger()
    resume = _resume_since()
    if resume is not None:
        logger.info("retry of %s: an archive made since the first attempt counts", target.label)
    result = core.backup_guest(api_for(inv), job, target, poll_max=poll_max, since=since,
                               resume_since=resume, timeout=timeout, slot=slot)
    result = replace(result, attempts=attempt)
    _forget_first_try()
    if result.status == "locked":
        logger.warning("guest %s is %s; will try again later in the run", target.label,
                       result.detail)
    elif result.status == "skipped":
        logger.info("guest %s: %s", target.label, result.detail)
    else:
        logger.info("guest %s: %s %s (%d bytes) in %.1f s%s", target.label, result.status,
                    result.volid, result.size, result.duration,
                    f" — {result.detail}" if result.detail else "")
    return result


@task(name="vzdump-retention", task_run_name="prune-{vmid}-{node}", timeout_seconds=1800,
      cache_policy=NO_CACHE, **RETRY)
def apply_retention(inv: Inventory, job: VzdumpJob, node: str, vmid: int, gtype: str,
                    dry_run: bool = False) -> core.RetentionResult:
    """Prune one guest's backups with the job's policy (PVE's prunebackups)."""
    logger = get_run_logger()
    res = core.apply_retention(api_for(inv), node, job.storage, vmid, gtype,  # type: ignore[arg-type]
                               job.retention, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    logger.info("retention %s for %s: %s %d (%s), kept %d, protected %d", res.retention, vmid,
                verb, len(res.remove), ", ".join(res.remove) or "-", res.kept, res.protected)
    return res


@dataclass(frozen=True)
class OffsiteOutcome:
    key: str
    status: str
    size: int
    seconds: float
    kept: tuple[str, ...]
    deleted: tuple[str, ...]

    def text(self) -> str:
        extra = f", {len(self.deleted)} old removed" if self.deleted else ""
        return f"{self.status}{extra}"


@task(name="vzdump-offsite", task_run_name="offsite-{backup.vmid}", timeout_seconds=6 * 3600,
      cache_policy=NO_CACHE, **RETRY)
def copy_offsite(inv: Inventory, job: VzdumpJob, backup: core.GuestBackup,
                 dry_run: bool = False) -> OffsiteOutcome:
    """Stream the guest's new archive from its node to the off-site target (an S3
    bucket, or a directory on an SSH host), verify it, then apply off-site retention
    for the guest."""
    logger = get_run_logger()
    off = job.offsite
    if off is None:
        raise ConfigError(f"vzdump job {job.name} has no offsite section")
    path = backup.archive_path or core.find_archive_path(api_for(inv), backup.node,
                                                         backup.vmid, backup.volid)
    if not path:
        raise PermanentError(f"cannot tell where {backup.volid} is on {backup.node} "
                             "(no vzdump task log names it)")
    verb = "would delete" if dry_run else "deleted"
    progress = progress_mod.Progress(f"offsite {backup.volid}", total=backup.size,
                                     interval=inv.settings.progress_interval)
    if off.host is not None:
        assert off.path is not None  # the inventory requires it with host
        dest = offsite.host_dir(str(off.path), backup.vmid)
        with SshPool() as pool:
            node = pool.get(offsite.node_ssh_target(inv, backup.node))
            host = pool.get(offsite.host_ssh_target(inv, off))
            with progress:
                copied = offsite.copy_archive_to_host(node, host, path=path, dest_dir=dest,
                                                      size=backup.size,
                                                      on_progress=progress.update)
            kept, deleted = offsite.apply_host_retention(
                host, dest, keep_last=off.keep_last, max_age_days=off.max_age_days,
                dry_run=dry_run)
        where = f"{off.host}:{copied.key}"
        logger.info("offsite %s: %s (%d bytes, %.1f s); kept %d, %s %d", where,
                    copied.status, copied.size, copied.seconds, len(kept), verb, len(deleted))
        return OffsiteOutcome(where, copied.status, copied.size, copied.seconds, tuple(kept),
                              tuple(deleted))
    target = offsite.target_for(inv, off)
    s3 = b2.client(target, timeout=60)
    key = offsite.object_key(off.prefix, backup.vmid, backup.volid)
    with SshPool() as pool:
        ssh = pool.get(offsite.node_ssh_target(inv, backup.node))
        with progress:
            copied = offsite.copy_archive(ssh, s3, target.bucket, path=path, key=key,
                                          size=backup.size, vmid=backup.vmid,
                                          volid=backup.volid, ctime=backup.ctime,
                                          on_part=lambda _n, done: progress.update(done))
    kept, deleted = offsite.apply_offsite_retention(
        s3, target.bucket, off.prefix, backup.vmid, keep_last=off.keep_last,
        max_age_days=off.max_age_days, dry_run=dry_run)
    logger.info("offsite %s: %s (%d bytes, %d parts, %.1f s); kept %d, %s %d", key,
                copied.status, copied.size, copied.parts, copied.seconds, len(kept),
                verb, len(deleted))
    return OffsiteOutcome(key, copied.status, copied.size, copied.seconds, tuple(kept),
                          tuple(deleted))
