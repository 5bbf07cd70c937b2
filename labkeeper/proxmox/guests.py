"""Guest operations: read config and status, create (LXC), clone (QEMU), restore,
configure, resize, power, destroy, and snapshots.

Each operation PVE runs as a task returns the task's :class:`Upid`; wait on it with
:func:`labkeeper.proxmox.tasks.wait_for_task`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

from labkeeper.proxmox.client import list_op, send, task_op
from labkeeper.proxmox.models import GuestConfig, GuestStatus, Snapshot, Upid, as_upid
from labkeeper.proxmox.request import ApiRequest, GuestType, Method, api_request, format_tags


def _gtype(gtype: str) -> str:
    if gtype not in ("lxc", "qemu"):
        raise ValueError(f"guest type must be lxc or qemu, not {gtype!r}")
    return gtype


def guest_config_request(node: str, vmid: int, gtype: GuestType, *,
                         snapshot: str | None = None) -> ApiRequest:
    return api_request("GET", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/config",
                       {"snapshot": snapshot}, node=node, vmid=vmid)


def guest_status_request(node: str, vmid: int, gtype: GuestType) -> ApiRequest:
    return api_request("GET", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/status/current",
                       node=node, vmid=vmid)


# --- create / clone / restore / configure / power / destroy

def create_lxc_request(node: str, vmid: int, ostemplate: str, *, hostname: str | None = None,
                       storage: str | None = None, rootfs: str | None = None,
                       memory: int | None = None, swap: int | None = None,
                       cores: int | None = None, net: Mapping[int, str] | None = None,
                       unprivileged: bool | None = None, features: str | None = None,
                       pool: str | None = None, tags: Iterable[str] | str | None = None,
                       onboot: bool | None = None, start: bool | None = None,
                       ssh_public_keys: str | None = None,
                       options: Mapping[str, Any] | None = None) -> ApiRequest:
    """``POST /nodes/{node}/lxc`` from a container template (``ostemplate`` volid)."""
    params: dict[str, Any] = {
        "vmid": vmid, "ostemplate": ostemplate, "hostname": hostname, "storage": storage,
        "rootfs": rootfs, "memory": memory, "swap": swap, "cores": cores,
        "unprivileged": unprivileged, "features": features, "pool": pool,
        "tags": format_tags(tags), "onboot": onboot, "start": start,
        "ssh-public-keys": ssh_public_keys,
    }
    for index, value in (net or {}).items():
        params[f"net{int(index)}"] = value
    params.update(options or {})
    return api_request("POST", "/nodes/{node}/lxc", params, node=node)


def restore_lxc_request(node: str, vmid: int, archive: str, *, storage: str | None = None,
                        force: bool | None = None, pool: str | None = None,
                        unique: bool | None = None, start: bool | None = None,
                        options: Mapping[str, Any] | None = None) -> ApiRequest:
    """``POST /nodes/{node}/lxc`` with ``restore=1`` and ``ostemplate`` = the backup volid."""
    params: dict[str, Any] = {"vmid": vmid, "ostemplate": archive, "restore": True,
                              "storage": storage, "force": force, "pool": pool,
                              "unique": unique, "start": start, **(options or {})}
    return api_request("POST", "/nodes/{node}/lxc", params, node=node)


def restore_qemu_request(node: str, vmid: int, archive: str, *, storage: str | None = None,
                         force: bool | None = None, pool: str | None = None,
                         unique: bool | None = None, start: bool | None = None,
                         options: Mapping[str, Any] | None = None) -> ApiRequest:
    """``POST /nodes/{node}/qemu`` with ``archive`` = the backup volid (PVE >= 7.2 applies
    extra ``options`` over the archived config)."""
    params = {"vmid": vmid, "archive": archive, "storage": storage, "force": force,
              "pool": pool, "unique": unique, "start": start, **(options or {})}
    return api_request("POST", "/nodes/{node}/qemu", params, node=node)


def clone_qemu_request(node: str, vmid: int, newid: int, *, name: str | None = None,
                       full: bool | None = None, target: str | None = None,
                       storage: str | None = None, pool: str | None = None,
                       snapname: str | None = None, disk_format: str | None = None) -> ApiRequest:
    """``POST /nodes/{node}/qemu/{vmid}/clone``: full or linked (from a template)."""
    if storage is not None and full is False:
        raise ValueError("a target storage needs a full clone (PVE refuses it for linked)")
    params = {"newid": newid, "name": name, "full": full, "target": target,
              "storage": storage, "pool": pool, "snapname": snapname, "format": disk_format}
    return api_request("POST", "/nodes/{node}/qemu/{vmid}/clone", params, node=node, vmid=vmid)


def configure_request(node: str, vmid: int, gtype: GuestType, options: Mapping[str, Any], *,
                      delete: Iterable[str] = (), digest: str | None = None,
                      asynchronous: bool = False) -> ApiRequest:
    """Change a guest's config: ``PUT .../config``; QEMU ``asynchronous`` uses POST (a task)."""
    deletes = list(delete)
    clash = set(deletes) & set(options)
    if clash:
        raise ValueError(f"cannot set and delete {sorted(clash)} at the same time")
    if asynchronous and gtype != "qemu":
        raise ValueError("only QEMU has an asynchronous config update (POST)")
    params: dict[str, Any] = {**options, "delete": ",".join(deletes) or None, "digest": digest}
    if "tags" in params:
        params["tags"] = format_tags(params["tags"])
    method: Method = "POST" if asynchronous else "PUT"
    return api_request(method, f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/config", params,
                       node=node, vmid=vmid)


def resize_request(node: str, vmid: int, gtype: GuestType, disk: str, size: str
                   ) -> ApiRequest:
    """Grow a disk: ``PUT .../resize`` with an absolute size (``16G``) or ``+4G``."""
    return api_request("PUT", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/resize",
                       {"disk": disk, "size": size}, node=node, vmid=vmid)


def power_request(node: str, vmid: int, gtype: GuestType,
                  action: Literal["start", "stop", "shutdown"], *,
                  timeout: int | None = None, force_stop: bool | None = None) -> ApiRequest:
    """``POST .../status/{start,stop,shutdown}``; ``timeout``/``force_stop`` for shutdown."""
    if action not in ("start", "stop", "shutdown"):
        raise ValueError(f"unknown power action {action!r}")
    params: dict[str, Any] = {}
    if action == "shutdown":
        params = {"timeout": timeout, "forceStop": force_stop}
    elif timeout is not None or force_stop is not None:
        raise ValueError("timeout/force_stop apply to shutdown only")
    return api_request("POST", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/status/{action}",
                       params, node=node, vmid=vmid)


def destroy_request(node: str, vmid: int, gtype: GuestType, *, purge: bool = True,
                    destroy_unreferenced_disks: bool = True) -> ApiRequest:
    """``DELETE /nodes/{node}/{type}/{vmid}`` (purge: also from backup jobs, HA, replication)."""
    params = {"purge": purge, "destroy-unreferenced-disks": destroy_unreferenced_disks}
    return api_request("DELETE", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}", params,
                       node=node, vmid=vmid)


# --- snapshots

def snapshot_list_request(node: str, vmid: int, gtype: GuestType) -> ApiRequest:
    return api_request("GET", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot",
                       node=node, vmid=vmid)


def snapshot_create_request(node: str, vmid: int, gtype: GuestType, name: str, *,
                            vmstate: bool | None = None) -> ApiRequest:
    """``POST .../snapshot``. (PVE also takes ``description``; the structure file this
    project validates against lost every parameter named ``description``, so the
    adapter does not send it.)"""
    if vmstate is not None and gtype != "qemu":
        raise ValueError("vmstate applies to QEMU snapshots only")
    params = {"snapname": name, "vmstate": vmstate}
    return api_request("POST", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot", params,
                       node=node, vmid=vmid)


def snapshot_rollback_request(node: str, vmid: int, gtype: GuestType, name: str, *,
                              start: bool | None = None) -> ApiRequest:
    return api_request("POST",
                       f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot/{{snapname}}/rollback",
                       {"start": start}, node=node, vmid=vmid, snapname=name)


def snapshot_delete_request(node: str, vmid: int, gtype: GuestType, name: str, *,
                            force: bool | None = None) -> ApiRequest:
    return api_request("DELETE", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot/{{snapname}}",
                       {"force": force}, node=node, vmid=vmid, snapname=name)


# --- operations

def guest_config(api: Any, node: str, vmid: int, gtype: GuestType, *,
                 snapshot: str | None = None) -> GuestConfig:
    return GuestConfig.from_api(
        send(api, guest_config_request(node, vmid, gtype, snapshot=snapshot)) or {})


def guest_status(api: Any, node: str, vmid: int, gtype: GuestType) -> GuestStatus:
    return GuestStatus.model_validate(send(api, guest_status_request(node, vmid, gtype)))


create_lxc = task_op(create_lxc_request)
restore_lxc = task_op(restore_lxc_request)
restore_qemu = task_op(restore_qemu_request)
clone_qemu = task_op(clone_qemu_request)
power = task_op(power_request)
destroy_guest = task_op(destroy_request)
create_snapshot = task_op(snapshot_create_request)
rollback_snapshot = task_op(snapshot_rollback_request)
delete_snapshot = task_op(snapshot_delete_request)


def start_guest(api: Any, node: str, vmid: int, gtype: GuestType) -> Upid:
    return power(api, node, vmid, gtype, "start")


def stop_guest(api: Any, node: str, vmid: int, gtype: GuestType) -> Upid:
    return power(api, node, vmid, gtype, "stop")


def shutdown_guest(api: Any, node: str, vmid: int, gtype: GuestType, *,
                   timeout: int | None = None, force_stop: bool | None = None) -> Upid:
    return power(api, node, vmid, gtype, "shutdown", timeout=timeout, force_stop=force_stop)


def configure(api: Any, node: str, vmid: int, gtype: GuestType, options: Mapping[str, Any], *,
              delete: Iterable[str] = (), digest: str | None = None,
              asynchronous: bool = False) -> Upid | None:
    """Update a guest's config. PUT answers when done (None); QEMU POST returns a UPID."""
    req = configure_request(node, vmid, gtype, options, delete=delete, digest=digest,
                            asynchronous=asynchronous)
    data = send(api, req)
    return as_upid(data, f"{req.method} {req.display}") if asynchronous else None


def resize_disk(api: Any, node: str, vmid: int, gtype: GuestType, disk: str,
                size: str) -> Upid:
    """Grow a guest disk (PVE never shrinks); returns the resize task."""
    req = resize_request(node, vmid, gtype, disk, size)
    return as_upid(send(api, req), f"{req.method} {req.display}")


list_snapshots_raw = list_op(snapshot_list_request, Snapshot)


def list_snapshots(api: Any, node: str, vmid: int, gtype: GuestType) -> list[Snapshot]:
    """The guest's snapshots (without PVE's ``current`` pseudo-entry)."""
    return [s for s in list_snapshots_raw(api, node, vmid, gtype) if s.name != "current"]
