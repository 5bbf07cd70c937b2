"""Backups and storage: vzdump, storage content, volume attributes, prune, and the
cluster's scheduled backup jobs (``/cluster/backup``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from labkeeper.proxmox.client import list_op, none_op, send, task_op
from labkeeper.proxmox.models import BackupJob, PruneMark, StorageVolume, Upid, as_upid
from labkeeper.proxmox.request import (
    ApiRequest,
    GuestType,
    api_request,
    format_retention,
    join_ids,
)


def vzdump_request(node: str, *, vmids: Sequence[int] = (), all_guests: bool = False,
                   pool: str | None = None, exclude: Sequence[int] = (),
                   mode: Literal["snapshot", "suspend", "stop"] = "snapshot",
                   compress: Literal["0", "gzip", "lzo", "zstd"] | None = "zstd",
                   storage: str | None = None, notes_template: str | None = None,
                   prune_backups: Mapping[str, int] | str | None = None,
                   protected: bool | None = None, remove: bool | None = None,
                   lockwait: int | None = None) -> ApiRequest:
    """``POST /nodes/{node}/vzdump`` for guests (``vmids``), a pool, or all on the node."""
    chosen = sum(bool(x) for x in (vmids, all_guests, pool))
    if chosen != 1:
        raise ValueError("select exactly one of vmids, all_guests, pool")
    if exclude and not (all_guests or pool):
        raise ValueError("exclude applies to all_guests or pool")
    params = {
        "vmid": join_ids(vmids) if vmids else None, "all": True if all_guests else None,
        "pool": pool, "exclude": join_ids(exclude) if exclude else None, "mode": mode,
        "compress": compress, "storage": storage, "notes-template": notes_template,
        "prune-backups": format_retention(prune_backups), "protected": protected,
        "remove": remove, "lockwait": lockwait,
    }
    return api_request("POST", "/nodes/{node}/vzdump", params, node=node)


def storage_content_request(node: str, storage: str, *, content: str | None = None,
                            vmid: int | None = None) -> ApiRequest:
    return api_request("GET", "/nodes/{node}/storage/{storage}/content",
                       {"content": content, "vmid": vmid}, node=node, storage=storage)


def storage_of(volid: str) -> str:
    storage, sep, _ = volid.partition(":")
    if not sep or not storage:
        raise ValueError(f"not a volume ID: {volid!r}")
    return storage


def delete_volume_request(node: str, volid: str, *, delay: int | None = None) -> ApiRequest:
    """``DELETE /nodes/{node}/storage/{storage}/content/{volume}`` (volid encoded)."""
    return api_request("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}",
                       {"delay": delay}, node=node, storage=storage_of(volid), volume=volid)


def volume_attributes_request(node: str, volid: str, *, protected: bool | None = None,
                              notes: str | None = None) -> ApiRequest:
    """``PUT /nodes/{node}/storage/{storage}/content/{volume}`` (``updateattributes``):
    mark a backup protected (no prune or retention removes it) or change its notes."""
    return api_request("PUT", "/nodes/{node}/storage/{storage}/content/{volume}",
                       {"protected": protected, "notes": notes}, node=node,
                       storage=storage_of(volid), volume=volid)


def prune_dry_run_request(node: str, storage: str, *,
                          prune_backups: Mapping[str, int] | str | None = None,
                          vmid: int | None = None,
                          gtype: GuestType | None = None) -> ApiRequest:
    params = {"prune-backups": format_retention(prune_backups), "vmid": vmid, "type": gtype}
    return api_request("GET", "/nodes/{node}/storage/{storage}/prunebackups", params,
                       node=node, storage=storage)


def prune_request(node: str, storage: str, *, vmid: int,
                  prune_backups: Mapping[str, int] | str | None = None,
                  gtype: GuestType | None = None) -> ApiRequest:
    """``DELETE .../prunebackups`` for one guest (a storage-wide prune would need the
    broader ``Datastore.Allocate``; per guest, ``VM.Backup`` + ``AllocateSpace`` suffice)."""
    params = {"prune-backups": format_retention(prune_backups), "vmid": vmid, "type": gtype}
    return api_request("DELETE", "/nodes/{node}/storage/{storage}/prunebackups", params,
                       node=node, storage=storage)


# --- backup jobs

def backup_jobs_request() -> ApiRequest:
    return api_request("GET", "/cluster/backup")


def backup_job_get_request(job_id: str) -> ApiRequest:
    return api_request("GET", "/cluster/backup/{id}", id=job_id)


def _job_params(schedule: str | None, vmids: Sequence[int], all_guests: bool | None,
                pool: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"schedule": schedule,
                              "vmid": join_ids(vmids) if vmids else None,
                              "all": all_guests, "pool": pool}
    for key, value in fields.items():
        name = key.replace("_", "-")
        if name == "prune-backups":
            value = format_retention(value)
        params[name] = value
    return params


def backup_job_create_request(job_id: str, *, schedule: str, vmids: Sequence[int] = (),
                              all_guests: bool | None = None, pool: str | None = None,
                              **fields: Any) -> ApiRequest:
    """``POST /cluster/backup``; ``fields`` use PVE's names with ``_`` for ``-``
    (storage, mode, compress, notes_template, prune_backups, enabled, comment, node ...)."""
    if sum(bool(x) for x in (vmids, all_guests, pool)) != 1:
        raise ValueError("select exactly one of vmids, all_guests, pool")
    params = {"id": job_id, **_job_params(schedule, vmids, all_guests, pool, fields)}
    return api_request("POST", "/cluster/backup", params)


def backup_job_update_request(job_id: str, *, schedule: str | None = None,
                              vmids: Sequence[int] = (), all_guests: bool | None = None,
                              pool: str | None = None, delete: Iterable[str] = (),
                              **fields: Any) -> ApiRequest:
    params = _job_params(schedule, vmids, all_guests, pool, fields)
    params["delete"] = ",".join(delete) or None
    return api_request("PUT", "/cluster/backup/{id}", params, id=job_id)


def backup_job_delete_request(job_id: str) -> ApiRequest:
    return api_request("DELETE", "/cluster/backup/{id}", id=job_id)


# --- operations

vzdump = task_op(vzdump_request)
prune_backups = task_op(prune_request)


def delete_volume(api: Any, node: str, volid: str) -> Upid | None:
    """Delete a volume (a backup archive, say); PVE answers with a task id."""
    req = delete_volume_request(node, volid)
    data = send(api, req)
    return as_upid(data, f"{req.method} {req.display}") if data else None


storage_content = list_op(storage_content_request, StorageVolume)
prune_dry_run = list_op(prune_dry_run_request, PruneMark)
list_backup_jobs = list_op(backup_jobs_request, BackupJob)


create_backup_job = none_op(backup_job_create_request)
update_backup_job = none_op(backup_job_update_request)
set_volume_attributes = none_op(volume_attributes_request)
delete_backup_job = none_op(backup_job_delete_request)


def get_backup_job(api: Any, job_id: str) -> BackupJob:
    return BackupJob.model_validate(send(api, backup_job_get_request(job_id)))


def backups(api: Any, node: str, storage: str, *, vmid: int | None = None) -> list[StorageVolume]:
    """Backup archives on a storage (newest first)."""
    vols = storage_content(api, node, storage, content="backup", vmid=vmid)
    return sorted(vols, key=lambda v: (v.ctime or 0, v.volid), reverse=True)
