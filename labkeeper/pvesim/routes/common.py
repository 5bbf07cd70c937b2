"""Guest helpers the routes share: lookup, locks, names, list entries, pools, and
putting a new guest record in place (or taking it away when its task fails)."""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.perms import Principal, require
from labkeeper.pvesim.routes.volumes import disk_volids, free_guest_volumes, size_to_bytes
from labkeeper.pvesim.state import new_guest

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


def guest_label(gtype: str) -> str:
    return "CT" if gtype == "lxc" else "VM"


def _conf_dir(gtype: str) -> str:
    return "lxc" if gtype == "lxc" else "qemu-server"


def check_node(sim: Simulator, node: str) -> None:
    if node not in sim.state["nodes"]:
        raise ApiError(
            500,
            f"hostname lookup '{node}' failed - failed to get address info for: {node}: "
            "Name or service not known",
        )


def find_guest(sim: Simulator, node: str, vmid: int, gtype: str) -> dict[str, Any]:
    check_node(sim, node)
    guest = sim.state["guests"].get(str(vmid))
    if guest is None or guest["type"] != gtype or guest["node"] != node:
        raise ApiError(
            500, f"Configuration file 'nodes/{node}/{_conf_dir(gtype)}/{vmid}.conf' does not exist"
        )
    return guest


def check_lock(guest: dict[str, Any], skiplock: bool = False) -> None:
    lock = guest["config"].get("lock")
    if lock and not skiplock:
        raise ApiError(500, f"{guest_label(guest['type'])} is locked ({lock})")


def check_unused(sim: Simulator, vmid: int) -> None:
    other = sim.state["guests"].get(str(vmid))
    if other is not None:
        raise ApiError(
            500, f"{guest_label(other['type'])} {vmid} already exists on node '{other['node']}'"
        )


def config_digest(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()  # noqa: S324


def guest_name(guest: dict[str, Any]) -> str:
    cfg = guest["config"]
    return str(cfg.get("hostname") or cfg.get("name")
               or f"{guest_label(guest['type'])}{guest['vmid']}")


def set_lock(sim: Simulator, guest: dict[str, Any], lock: str | None) -> None:
    with sim.lock:
        if lock is None:
            guest["config"].pop("lock", None)
        else:
            guest["config"]["lock"] = lock


def unlock_callback(sim: Simulator, guest: dict[str, Any]) -> Callable[[], None]:
    return lambda: set_lock(sim, guest, None)


def add_to_pool(sim: Simulator, pool: str | None, vmid: int) -> None:
    if not pool:
        return
    pools = sim.state["pools"]
    if pool not in pools:
        raise ApiError(500, f"pool '{pool}' does not exist")
    members = pools[pool].setdefault("vms", [])
    if vmid not in members:
        members.append(vmid)
    guest = sim.state["guests"].get(str(vmid))
    if guest is not None:
        guest["pool"] = pool


def require_allocate(who: Principal, pool: str | None, vmid: int) -> None:
    """VM.Allocate on the pool the new guest joins, else on the guest itself."""
    require(who, f"/pool/{pool}" if pool else f"/vms/{vmid}", "VM.Allocate")


def check_replaceable(
    sim: Simulator, existing: dict[str, Any] | None, vmid: int, gtype: str, node: str,
    replace: bool,
) -> None:
    """A create may only overwrite a stopped, unlocked guest of its type on its node,
    and only as a forced restore."""
    if existing is None:
        return
    if not replace or existing["type"] != gtype or existing["node"] != node:
        check_unused(sim, vmid)
    check_lock(existing)
    if existing["status"] == "running":
        label = guest_label(gtype)
        raise ApiError(500, f"unable to restore {label} {vmid} - {label} is running")


def register_guest(
    sim: Simulator, vmid: int, gtype: str, node: str, config: dict[str, Any],
    existing: dict[str, Any] | None, pool: str | None,
) -> dict[str, Any]:
    """Put a new guest record in place (replacing ``existing``, keeping its rootfs dir)."""
    with sim.lock:
        if existing is None:
            check_unused(sim, vmid)  # PVE creates the config under a cluster lock
        old_rootfs_dir = existing.get("rootfs_dir") if existing else None
        if existing is not None:
            free_guest_volumes(sim, existing, None)
        guest = new_guest(vmid, gtype, node, config)
        guest["rootfs_dir"] = old_rootfs_dir
        sim.state["guests"][str(vmid)] = guest
        add_to_pool(sim, pool, vmid)
    return guest


def finish_create(sim: Simulator, guest: dict[str, Any], start: bool) -> None:
    """The end of a create or restore task: unlock, and start the guest if asked."""
    with sim.lock:
        guest["config"].pop("lock", None)
        if start:
            guest["status"] = "running"
            guest["started_at"] = time.time()


def discard_callback(sim: Simulator, guest: dict[str, Any]) -> Callable[[], None]:
    """Undo a half-made guest when its create, restore or clone task fails."""

    def discard() -> None:
        with sim.lock:
            free_guest_volumes(sim, guest, None)
            sim.state["guests"].pop(str(guest["vmid"]), None)
            remove_from_pools(sim, guest["vmid"])

    return discard


def remove_from_pools(sim: Simulator, vmid: int) -> None:
    for pool in sim.state["pools"].values():
        if vmid in pool.get("vms", []):
            pool["vms"].remove(vmid)


def random_mac() -> str:
    return "BC:24:11:" + ":".join(f"{b:02X}" for b in secrets.token_bytes(3))


def guest_entry(sim: Simulator, guest: dict[str, Any]) -> dict[str, Any]:
    cfg = guest["config"]
    running = guest["status"] == "running"
    mem_match = re.search(r"(\d+)", str(cfg.get("memory", 512)))
    maxmem = int(mem_match.group(1) if mem_match else 512) * 1024**2
    maxdisk = 0
    for key, value in disk_volids(cfg).items():
        if key.startswith("unused") or "cloudinit" in value:
            continue
        match = re.search(r"size=(\d+(?:\.\d+)?[KMGT]?)", str(cfg[key]))
        if match:
            maxdisk += size_to_bytes(match.group(1))
    uptime = int(time.time() - guest["started_at"]) if running and guest["started_at"] else 0
    entry: dict[str, Any] = {
        "vmid": guest["vmid"],
        "name": guest_name(guest),
        "status": guest["status"],
        "maxmem": maxmem,
        "mem": maxmem // 4 if running else 0,
        "maxdisk": maxdisk,
        "disk": maxdisk // 5 if running else 0,
        "cpus": int(cfg.get("cores", 1)) * int(cfg.get("sockets", 1)),
        "cpu": 0.01 if running else 0,
        "uptime": uptime,
        "netin": 0,
        "netout": 0,
        "diskread": 0,
        "diskwrite": 0,
        "template": int(cfg.get("template", 0)),
        "type": guest["type"],
    }
    if guest["type"] == "lxc":
        entry["maxswap"] = int(cfg.get("swap", 512)) * 1024**2
    if cfg.get("tags"):
        entry["tags"] = cfg["tags"]
    if cfg.get("lock"):
        entry["lock"] = cfg["lock"]
    return entry


def config_out(guest: dict[str, Any], snapname: str | None = None) -> dict[str, Any]:
    if snapname:
        snap = guest["snapshots"].get(snapname)
        if snap is None:
            raise ApiError(500, f"snapshot '{snapname}' does not exist")
        cfg = dict(snap["config"])
        cfg["snaptime"] = snap["snaptime"]
        if snap.get("description"):
            cfg["description"] = snap["description"]
    else:
        cfg = dict(guest["config"])
        if guest.get("parent"):
            cfg["parent"] = guest["parent"]
    cfg["digest"] = config_digest(guest["config"])
    return cfg


def vmid_list(text: str | None) -> list[int]:
    return [int(v) for v in re.split(r"[,;\s]+", text or "") if v]
