"""vzdump as Prefect tasks: one task run per guest for the backup, its retention and its
off-site copy (each with its own state, retries and history in the UI)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from labkeeper import b2, offsite
from labkeeper import proxmox as px
from labkeeper import vzdump as core
from labkeeper.errors import ConfigError, PermanentError
from labkeeper.inventory import Inventory, VzdumpJob
from labkeeper.ssh import SshPool
from tasks.common import RETRY


def api_for(inv: Inventory) -> Any:
    if inv.proxmox is None:
        raise ConfigError("the inventory has no proxmox section")
    return px.connect(inv.proxmox)


@task(name="vzdump-select", task_run_name="select-{job.name}", timeout_seconds=300,
      cache_policy=NO_CACHE, **RETRY)
def select_guests(inv: Inventory, job: VzdumpJob) -> core.Resolved:
    """Resolve the job's selection against /cluster/resources now."""
    return core.resolve(api_for(inv), inv, job)


@task(name="vzdump-guest", task_run_name="vzdump-{target.vmid}-{target.node}-try{attempt}",
      timeout_seconds=4 * 3600, cache_policy=NO_CACHE, **RETRY)
def backup_guest(inv: Inventory, job: VzdumpJob, target: core.Target, attempt: int = 1,
                 since: float | None = None, poll_max: float = 5.0,
                 timeout: float | None = None) -> core.GuestBackup:
    """vzdump one guest, wait for it, verify the new archive (or report it locked)."""
    logger = get_run_logger()
    result = core.backup_guest(api_for(inv), job, target, poll_max=poll_max, since=since,
                               timeout=timeout)
    result = replace(result, attempts=attempt)
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
    """Stream the guest's new archive from its node into the off-site bucket, verify it,
    then apply off-site retention for the guest."""
    logger = get_run_logger()
    if job.offsite is None:
        raise ConfigError(f"vzdump job {job.name} has no offsite section")
    target = offsite.target_for(inv, job.offsite)
    s3 = b2.client(target, timeout=60)
    path = backup.archive_path or core.find_archive_path(api_for(inv), backup.node,
                                                         backup.vmid, backup.volid)
    if not path:
        raise PermanentError(f"cannot tell where {backup.volid} is on {backup.node} "
                             "(no vzdump task log names it)")
    key = offsite.object_key(job.offsite.prefix, backup.vmid, backup.volid)
    with SshPool() as pool:
        ssh = pool.get(offsite.node_ssh_target(inv, backup.node))
        copied = offsite.copy_archive(ssh, s3, target.bucket, path=path, key=key,
                                      size=backup.size, vmid=backup.vmid, volid=backup.volid,
                                      ctime=backup.ctime)
    kept, deleted = offsite.apply_offsite_retention(
        s3, target.bucket, job.offsite.prefix, backup.vmid, keep_last=job.offsite.keep_last,
        max_age_days=job.offsite.max_age_days, dry_run=dry_run)
    logger.info("offsite %s: %s (%d bytes, %d parts, %.1f s); kept %d, %s %d", key,
                copied.status, copied.size, copied.parts, copied.seconds, len(kept),
                "would delete" if dry_run else "deleted", len(deleted))
    return OffsiteOutcome(key, copied.status, copied.size, copied.seconds, tuple(kept),
                          tuple(deleted))
