"""Endpoint behaviour of the simulator (state changes, tasks, PVE's error texts)."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import re
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim import prune
from labkeeper.pvesim.calendar import parse_calendar_event
from labkeeper.pvesim.perms import PermissionDenied, Principal, require
from labkeeper.pvesim.state import BACKUP_EXT, GiB, new_guest
from labkeeper.pvesim.tasks import TaskFailed, TaskRun, parse_upid

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator

PVE_VERSION = {"version": "9.1.1", "release": "9.1", "repoid": "42ab5c7e"}
PVEVERSION_STRING = "pve-manager/9.1.1/42ab5c7e07b8e4d1"
KERNEL = "6.17.2-1-pve"


def _api_error(status: int, message: str, errors: dict[str, str] | None = None) -> Exception:
    from labkeeper.pvesim.server import ApiError

    return ApiError(status, message, errors)


@dataclass
class Ctx:
    sim: Simulator
    who: Principal | None
    p: dict[str, Any]

    @property
    def user(self) -> str:
        return self.who.userid if self.who else "root@pam"

    @property
    def principal(self) -> Principal:
        return self.who or Principal("root@pam")


Handler = Callable[[Ctx], Any]
ROUTES: dict[tuple[str, str], Handler] = {}


def route(method: str, *templates: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for template in templates:
            ROUTES[(method, template)] = fn
        return fn

    return deco


# ============================================================================ helpers


def _label(gtype: str) -> str:
    return "CT" if gtype == "lxc" else "VM"


def _conf_dir(gtype: str) -> str:
    return "lxc" if gtype == "lxc" else "qemu-server"


def _check_node(sim: Simulator, node: str) -> None:
    if node not in sim.state["nodes"]:
        raise _api_error(
            500,
            f"hostname lookup '{node}' failed - failed to get address info for: {node}: "
            "Name or service not known",
        )


def _guest(sim: Simulator, node: str, vmid: int, gtype: str) -> dict[str, Any]:
    _check_node(sim, node)
    guest = sim.state["guests"].get(str(vmid))
    if guest is None or guest["type"] != gtype or guest["node"] != node:
        raise _api_error(
            500, f"Configuration file 'nodes/{node}/{_conf_dir(gtype)}/{vmid}.conf' does not exist"
        )
    return guest


def _check_lock(guest: dict[str, Any], skiplock: bool = False) -> None:
    lock = guest["config"].get("lock")
    if lock and not skiplock:
        raise _api_error(500, f"{_label(guest['type'])} is locked ({lock})")


def _check_unused(sim: Simulator, vmid: int) -> None:
    other = sim.state["guests"].get(str(vmid))
    if other is not None:
        raise _api_error(
            500, f"{_label(other['type'])} {vmid} already exists on node '{other['node']}'"
        )


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()  # noqa: S324


def _size_to_bytes(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]?)", str(text))
    if not match:
        return 0
    mult = {"": GiB, "K": 1024, "M": 1024**2, "G": GiB, "T": 1024**4}[match.group(2)]
    return int(float(match.group(1)) * mult)


def _size_text(size: int) -> str:
    if size % GiB == 0:
        return f"{size // GiB}G"
    return f"{size // 1024**2}M"


def _split_volid(volid: str) -> tuple[str, str]:
    storage, sep, volname = volid.partition(":")
    if not sep:
        raise _api_error(500, f"unable to parse volume ID '{volid}'")
    return storage, volname


def _storage(sim: Simulator, storage: str) -> dict[str, Any]:
    cfg = sim.state["storages"].get(storage)
    if cfg is None:
        raise _api_error(500, f"storage '{storage}' does not exist")
    return cfg


def _volumes(sim: Simulator, node: str, storage: str) -> dict[str, dict[str, Any]]:
    _storage(sim, storage)
    return sim.state["volumes"].setdefault(node, {}).setdefault(storage, {})


def _storage_used(sim: Simulator, node: str, storage: str) -> int:
    return sum(int(v.get("size", 0)) for v in _volumes(sim, node, storage).values())


def _has_content(cfg: dict[str, Any], content: str) -> bool:
    return content in cfg["content"].split(",")


_DISK_KEY = re.compile(r"^(rootfs|mp\d+|scsi\d+|virtio\d+|sata\d+|ide\d+|efidisk0|tpmstate0)$")


def _disk_volids(config: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in config.items():
        if _DISK_KEY.match(key) or re.fullmatch(r"unused\d+", key):
            first = str(value).split(",")[0]
            if first.startswith("volume="):
                first = first[len("volume="):]
            if (":" in first and "media=cdrom" not in str(value)) or "cloudinit" in first:
                out[key] = first
    return out


def _next_disk_name(sim: Simulator, node: str, storage: str, vmid: int) -> str:
    vols = _volumes(sim, node, storage)
    n = 0
    while f"{storage}:vm-{vmid}-disk-{n}" in vols:
        n += 1
    return f"vm-{vmid}-disk-{n}"


def _alloc(
    sim: Simulator, node: str, storage: str, volname: str, size: int, vmid: int, content: str
) -> str:
    volid = f"{storage}:{volname}"
    _volumes(sim, node, storage)[volid] = {
        "volid": volid,
        "content": content,
        "format": "raw",
        "size": size,
        "vmid": vmid,
        "ctime": int(time.time()),
    }
    return volid


def _free_guest_volumes(sim: Simulator, guest: dict[str, Any], run: TaskRun | None) -> None:
    node = guest["node"]
    for storage_vols in sim.state["volumes"].get(node, {}).values():
        for volid in [v for v, e in storage_vols.items()
                      if e.get("vmid") == guest["vmid"] and e["content"] in ("images", "rootdir")]:
            del storage_vols[volid]
            if run is not None:
                volname = volid.split(":", 1)[1].split("/")[-1]
                run.log(f'  Logical volume "{volname}" successfully removed.')


def _snapshot_capable(sim: Simulator, config: dict[str, Any]) -> bool:
    for volid in _disk_volids(config).values():
        storage = volid.split(":", 1)[0]
        cfg = sim.state["storages"].get(storage)
        if cfg is None or not cfg.get("snapshots"):
            return False
    return True


def _sim_dir(sim: Simulator, *parts: str) -> Path:
    path = sim.data_dir.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replace_dir_contents(target: Path, source: Path | None) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for child in target.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    if source is not None and source.exists():
        shutil.copytree(source, target, dirs_exist_ok=True, symlinks=True)


def _guest_name(guest: dict[str, Any]) -> str:
    cfg = guest["config"]
    return str(cfg.get("hostname") or cfg.get("name") or f"{_label(guest['type'])}{guest['vmid']}")


def _set_lock(sim: Simulator, guest: dict[str, Any], lock: str | None) -> None:
    with sim.lock:
        if lock is None:
            guest["config"].pop("lock", None)
        else:
            guest["config"]["lock"] = lock


def _unlock_cb(sim: Simulator, guest: dict[str, Any]) -> Callable[[], None]:
    return lambda: _set_lock(sim, guest, None)


def _add_to_pool(sim: Simulator, pool: str | None, vmid: int) -> None:
    if not pool:
        return
    pools = sim.state["pools"]
    if pool not in pools:
        raise _api_error(500, f"pool '{pool}' does not exist")
    members = pools[pool].setdefault("vms", [])
    if vmid not in members:
        members.append(vmid)
    guest = sim.state["guests"].get(str(vmid))
    if guest is not None:
        guest["pool"] = pool


def _remove_from_pools(sim: Simulator, vmid: int) -> None:
    for pool in sim.state["pools"].values():
        if vmid in pool.get("vms", []):
            pool["vms"].remove(vmid)


def _mac() -> str:
    return "BC:24:11:" + ":".join(f"{b:02X}" for b in secrets.token_bytes(3))


# ============================================================================ cluster


@route("GET", "/version")
def version(ctx: Ctx) -> Any:
    return dict(PVE_VERSION)


@route("GET", "/nodes")
def nodes(ctx: Ctx) -> Any:
    return [_node_entry(ctx.sim, node) for node in ctx.sim.state["nodes"]
            if ctx.principal.has(f"/nodes/{node}", "Sys.Audit") or True]


def _node_entry(sim: Simulator, node: str) -> dict[str, Any]:
    uptime = int(time.time()) - int(sim.state["started"])
    return {
        "node": node,
        "id": f"node/{node}",
        "type": "node",
        "status": "online",
        "cpu": 0.03,
        "maxcpu": 8,
        "mem": 6 * GiB,
        "maxmem": 32 * GiB,
        "disk": 12 * GiB,
        "maxdisk": 100 * GiB,
        "uptime": max(uptime, 1),
        "level": "",
        "ssl_fingerprint": sim.fingerprint,
    }


@route("GET", "/nodes/{node}")
def node_index(ctx: Ctx) -> Any:
    _check_node(ctx.sim, ctx.p["node"])
    return [{"name": n} for n in ("lxc", "qemu", "status", "storage", "tasks", "vzdump")]


@route("GET", "/nodes/{node}/status")
def node_status(ctx: Ctx) -> Any:
    _check_node(ctx.sim, ctx.p["node"])
    uptime = max(1, int(time.time()) - int(ctx.sim.state["started"]))
    return {
        "boot-info": {"mode": "efi", "secureboot": 0},
        "cpu": 0.03,
        "cpuinfo": {"cores": 4, "cpus": 8, "model": "Simulated CPU", "sockets": 1,
                    "mhz": "3000.000"},
        "current-kernel": {"machine": "x86_64", "release": KERNEL, "sysname": "Linux",
                           "version": "#1 SMP PREEMPT_DYNAMIC PMX 6.17.2-1"},
        "loadavg": ["0.10", "0.12", "0.09"],
        "memory": {"available": 26 * GiB, "free": 26 * GiB, "total": 32 * GiB,
                   "used": 6 * GiB},
        "pveversion": PVEVERSION_STRING,
        "kversion": f"Linux {KERNEL}",
        "rootfs": {"avail": 88 * GiB, "free": 88 * GiB, "total": 100 * GiB, "used": 12 * GiB},
        "swap": {"free": 8 * GiB, "total": 8 * GiB, "used": 0},
        "uptime": uptime,
        "wait": 0,
    }


@route("GET", "/cluster/status")
def cluster_status(ctx: Ctx) -> Any:
    sim = ctx.sim
    out: list[dict[str, Any]] = [{
        "id": "cluster", "name": sim.cluster_name, "type": "cluster",
        "nodes": len(sim.state["nodes"]), "quorate": 1, "version": len(sim.state["nodes"]),
    }]
    for i, node in enumerate(sim.state["nodes"], start=1):
        out.append({"id": f"node/{node}", "name": node, "type": "node", "nodeid": i,
                    "online": 1, "local": 1 if i == 1 else 0, "ip": f"127.0.0.{i}",
                    "level": ""})
    return out


@route("GET", "/cluster/nextid")
def nextid(ctx: Ctx) -> Any:
    guests = ctx.sim.state["guests"]
    wanted = ctx.p.get("vmid")
    if wanted is not None:
        if str(wanted) in guests:
            raise _api_error(400, "Parameter verification failed.",
                             {"vmid": f"VM {wanted} already exists"})
        return int(wanted)
    vmid = 100
    while str(vmid) in guests:
        vmid += 1
    return vmid


def _guest_entry(sim: Simulator, guest: dict[str, Any]) -> dict[str, Any]:
    cfg = guest["config"]
    running = guest["status"] == "running"
    mem_match = re.search(r"(\d+)", str(cfg.get("memory", 512)))
    maxmem = int(mem_match.group(1) if mem_match else 512) * 1024**2
    maxdisk = 0
    for key, value in _disk_volids(cfg).items():
        if key.startswith("unused") or "cloudinit" in value:
            continue
        match = re.search(r"size=(\d+(?:\.\d+)?[KMGT]?)", str(cfg[key]))
        if match:
            maxdisk += _size_to_bytes(match.group(1))
    uptime = int(time.time() - guest["started_at"]) if running and guest["started_at"] else 0
    entry: dict[str, Any] = {
        "vmid": guest["vmid"],
        "name": _guest_name(guest),
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


@route("GET", "/cluster/resources")
def cluster_resources(ctx: Ctx) -> Any:
    sim, rtype = ctx.sim, ctx.p.get("type")
    out: list[dict[str, Any]] = []
    if rtype in (None, "vm"):
        for guest in sorted(sim.state["guests"].values(), key=lambda g: g["vmid"]):
            if not ctx.principal.has(f"/vms/{guest['vmid']}", "VM.Audit"):
                continue
            entry = _guest_entry(sim, guest)
            entry.update({"id": f"{guest['type']}/{guest['vmid']}", "node": guest["node"],
                          "maxcpu": entry.pop("cpus")})
            entry["hastate"] = None
            del entry["hastate"]
            if guest.get("pool"):
                entry["pool"] = guest["pool"]
            out.append(entry)
    if rtype in (None, "node"):
        for node in sim.state["nodes"]:
            entry = _node_entry(sim, node)
            entry.pop("ssl_fingerprint")
            entry["cgroup-mode"] = 2
            out.append(entry)
    if rtype in (None, "storage"):
        for node in sim.state["nodes"]:
            for sid, cfg in sim.state["storages"].items():
                if not ctx.principal.has(f"/storage/{sid}", "Datastore.Audit"):
                    continue
                used = _storage_used(sim, node, sid)
                out.append({
                    "id": f"storage/{node}/{sid}", "type": "storage", "storage": sid,
                    "node": node, "status": "available", "content": cfg["content"],
                    "plugintype": cfg["type"], "shared": cfg.get("shared", 0),
                    "disk": used, "maxdisk": int(cfg["total"]),
                })
    if rtype is None:
        for poolid in sorted(sim.state["pools"]):
            out.append({"id": f"/pool/{poolid}", "type": "pool", "pool": poolid})
    return out


# ============================================================================ access


@route("POST", "/access/ticket")
def access_ticket(ctx: Ctx) -> Any:
    return ctx.sim.create_ticket(ctx.p["username"], ctx.p["password"], ctx.p.get("realm"))


@route("GET", "/access/permissions")
def access_permissions(ctx: Ctx) -> Any:
    privs = ctx.principal.privileges
    if privs is None:
        return {"/": {p: 1 for p in ALL_PRIVILEGES}}
    if isinstance(privs, frozenset):
        return {"/": {p: 1 for p in sorted(privs)}}
    return {path: {p: 1 for p in sorted(v)} for path, v in privs.items()}


ALL_PRIVILEGES = (
    "Datastore.Allocate", "Datastore.AllocateSpace", "Datastore.AllocateTemplate",
    "Datastore.Audit", "Pool.Allocate", "Pool.Audit", "Sys.Audit", "Sys.Modify",
    "Sys.PowerMgmt", "VM.Allocate", "VM.Audit", "VM.Backup", "VM.Clone", "VM.Config.CDROM",
    "VM.Config.CPU", "VM.Config.Cloudinit", "VM.Config.Disk", "VM.Config.HWType",
    "VM.Config.Memory", "VM.Config.Network", "VM.Config.Options", "VM.Console",
    "VM.Migrate", "VM.PowerMgmt", "VM.Snapshot", "VM.Snapshot.Rollback",
)


# ============================================================================ pools


@route("GET", "/pools")
def pools_list(ctx: Ctx) -> Any:
    out = []
    for poolid, pool in sorted(ctx.sim.state["pools"].items()):
        if ctx.p.get("poolid") and ctx.p["poolid"] != poolid:
            continue
        entry: dict[str, Any] = {"poolid": poolid}
        if pool.get("comment"):
            entry["comment"] = pool["comment"]
        if ctx.p.get("poolid"):
            entry["members"] = _pool_members(ctx.sim, pool)
        out.append(entry)
    return out


def _pool_members(sim: Simulator, pool: dict[str, Any]) -> list[dict[str, Any]]:
    members = []
    for vmid in pool.get("vms", []):
        guest = sim.state["guests"].get(str(vmid))
        if guest is not None:
            entry = _guest_entry(sim, guest)
            entry.update({"id": f"{guest['type']}/{vmid}", "node": guest["node"]})
            members.append(entry)
    return members


@route("POST", "/pools")
def pools_create(ctx: Ctx) -> Any:
    poolid = ctx.p["poolid"]
    if poolid in ctx.sim.state["pools"]:
        raise _api_error(500, f"pool '{poolid}' already exists")
    ctx.sim.state["pools"][poolid] = {"comment": ctx.p.get("comment", ""), "vms": []}
    return None


@route("GET", "/pools/{poolid}")
def pools_get(ctx: Ctx) -> Any:
    pool = ctx.sim.state["pools"].get(ctx.p["poolid"])
    if pool is None:
        raise _api_error(500, f"pool '{ctx.p['poolid']}' does not exist")
    return {"comment": pool.get("comment", ""), "members": _pool_members(ctx.sim, pool)}


# ============================================================================ guests: read


def _list_guests(ctx: Ctx, gtype: str) -> list[dict[str, Any]]:
    node = ctx.p["node"]
    _check_node(ctx.sim, node)
    out = []
    for guest in sorted(ctx.sim.state["guests"].values(), key=lambda g: g["vmid"]):
        if guest["node"] == node and guest["type"] == gtype and ctx.principal.has(
            f"/vms/{guest['vmid']}", "VM.Audit"
        ):
            entry = _guest_entry(ctx.sim, guest)
            if gtype == "qemu":
                entry.pop("type")
                entry.pop("maxswap", None)
            out.append(entry)
    return out


@route("GET", "/nodes/{node}/lxc")
def lxc_list(ctx: Ctx) -> Any:
    return _list_guests(ctx, "lxc")


@route("GET", "/nodes/{node}/qemu")
def qemu_list(ctx: Ctx) -> Any:
    return _list_guests(ctx, "qemu")


@route("GET", "/nodes/{node}/lxc/{vmid}", "/nodes/{node}/qemu/{vmid}")
def guest_index(ctx: Ctx) -> Any:
    gtype = "lxc" if ctx.sim.state["guests"].get(str(ctx.p["vmid"]), {}).get("type") == "lxc" \
        else "qemu"
    _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    return [{"subdir": s} for s in ("config", "status", "snapshot", "clone")]


def _status_current(ctx: Ctx, gtype: str) -> Any:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    entry = _guest_entry(ctx.sim, guest)
    entry["ha"] = {"managed": 0}
    if gtype == "qemu":
        entry["qmpstatus"] = guest["status"]
        entry.pop("type")
        entry["agent"] = 1 if str(guest["config"].get("agent", "0")).startswith("1") else 0
    return entry


@route("GET", "/nodes/{node}/lxc/{vmid}/status/current")
def lxc_status(ctx: Ctx) -> Any:
    return _status_current(ctx, "lxc")


@route("GET", "/nodes/{node}/qemu/{vmid}/status/current")
def qemu_status(ctx: Ctx) -> Any:
    return _status_current(ctx, "qemu")


@route("GET", "/nodes/{node}/lxc/{vmid}/status", "/nodes/{node}/qemu/{vmid}/status")
def guest_status_index(ctx: Ctx) -> Any:
    return [{"subdir": s} for s in ("current", "start", "stop", "shutdown", "reboot")]


def _config_out(guest: dict[str, Any], snapname: str | None = None) -> dict[str, Any]:
    if snapname:
        snap = guest["snapshots"].get(snapname)
        if snap is None:
            raise _api_error(500, f"snapshot '{snapname}' does not exist")
        cfg = dict(snap["config"])
        cfg["snaptime"] = snap["snaptime"]
        if snap.get("description"):
            cfg["description"] = snap["description"]
    else:
        cfg = dict(guest["config"])
        if guest.get("parent"):
            cfg["parent"] = guest["parent"]
    cfg["digest"] = _digest(guest["config"])
    return cfg


@route("GET", "/nodes/{node}/lxc/{vmid}/config")
def lxc_config(ctx: Ctx) -> Any:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], "lxc")
    return _config_out(guest, ctx.p.get("snapshot"))


@route("GET", "/nodes/{node}/qemu/{vmid}/config")
def qemu_config(ctx: Ctx) -> Any:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], "qemu")
    return _config_out(guest, ctx.p.get("snapshot"))


_NOT_CONFIG = {"node", "vmid", "delete", "digest", "revert", "skiplock", "force",
               "background_delay"}


def _apply_config(ctx: Ctx, gtype: str) -> dict[str, Any]:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    p = ctx.p
    if "lock" not in p:
        _check_lock(guest, bool(p.get("skiplock")))
    if p.get("digest") and p["digest"] != _digest(guest["config"]):
        raise _api_error(500, "detected modified configuration - file changed by other user? "
                              "Try again.")
    deletes = [d for d in re.split(r"[,;\s]+", p.get("delete", "")) if d]
    for key in deletes:
        if key in p:
            raise _api_error(400, "Parameter verification failed.",
                             {"delete": f"cannot set and delete '{key}' at the same time"})
    with ctx.sim.lock:
        for key in deletes:
            guest["config"].pop(key, None)
        for key, value in p.items():
            if key not in _NOT_CONFIG:
                guest["config"][key] = value
    return guest


@route("PUT", "/nodes/{node}/lxc/{vmid}/config")
def lxc_config_put(ctx: Ctx) -> Any:
    _apply_config(ctx, "lxc")
    return None


@route("PUT", "/nodes/{node}/qemu/{vmid}/config")
def qemu_config_put(ctx: Ctx) -> Any:
    _apply_config(ctx, "qemu")
    return None


@route("POST", "/nodes/{node}/qemu/{vmid}/config")
def qemu_config_post(ctx: Ctx) -> Any:
    guest = _apply_config(ctx, "qemu")

    def work(run: TaskRun) -> None:
        run.sleep(0.25)
        run.check_injected()

    return ctx.sim.tasks.start(guest["node"], "qmconfig", guest["vmid"], ctx.user, work,
                               vmid=guest["vmid"])


# ============================================================================ power


def _power(ctx: Ctx, gtype: str, action: str) -> str:
    sim = ctx.sim
    guest = _guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    vmid, label = guest["vmid"], _label(gtype)
    skiplock = bool(ctx.p.get("skiplock"))
    if skiplock and ctx.user != "root@pam":
        raise PermissionDenied("Permission check failed (skiplock: only root may use this option)")
    _check_lock(guest, skiplock)
    running = guest["status"] == "running"
    if action == "start":
        if int(guest["config"].get("template", 0)):
            raise _api_error(500, "you can't start a CT if it's a template" if gtype == "lxc"
                             else "you can't start a vm if it's a template")
        if running:
            raise _api_error(500, f"{label} {vmid} already running")
    elif not running:
        raise _api_error(500, f"{label} {vmid} not running")
    prefix = "vz" if gtype == "lxc" else "qm"

    def work(run: TaskRun) -> None:
        run.sleep()
        run.check_injected()
        with sim.lock:
            if action in ("start", "reboot"):
                guest["status"] = "running"
                guest["started_at"] = time.time()
            else:
                guest["status"] = "stopped"
                guest["started_at"] = None

    return sim.tasks.start(guest["node"], f"{prefix}{action}", vmid, ctx.user, work, vmid=vmid)


for _gtype in ("lxc", "qemu"):
    for _action in ("start", "stop", "shutdown", "reboot"):
        ROUTES[("POST", f"/nodes/{{node}}/{_gtype}/{{vmid}}/status/{_action}")] = (
            lambda ctx, _g=_gtype, _a=_action: _power(ctx, _g, _a)
        )


# ============================================================================ create / restore


def _template_ostype(name: str) -> str:
    for os_name in ("debian", "ubuntu", "alpine", "centos", "fedora", "archlinux", "rocky"):
        if os_name in name:
            return os_name
    return "unmanaged"


def _find_volume(sim: Simulator, node: str, volid: str) -> dict[str, Any] | None:
    storage, _ = _split_volid(volid)
    if storage not in sim.state["storages"]:
        raise _api_error(500, f"storage '{storage}' does not exist")
    return _volumes(sim, node, storage).get(volid)


def _volume_path(sim: Simulator, volid: str, node: str | None = None) -> str:
    storage, volname = _split_volid(volid)
    cfg = sim.state["storages"][storage]
    if node is not None and sim.host_paths and volname.startswith("backup/"):
        # Where the archive really is on this machine (an SSH/SFTP stand-in for the
        # node, e.g. the local lab's sshd, can then read it at the path PVE reports).
        return str(_archive_file(sim, node, volid))
    if cfg["type"] == "dir":
        base = cfg.get("path", f"/mnt/pve/{storage}")
        if volname.startswith("vztmpl/"):
            return f"{base}/template/cache/{volname[7:]}"
        if volname.startswith("backup/"):
            return f"{base}/dump/{volname[7:]}"
        if volname.startswith("iso/"):
            return f"{base}/template/iso/{volname[4:]}"
        return f"{base}/{volname}"
    return f"/dev/pve/{volname.split('/')[-1]}"


def _parse_rootfs(value: str) -> tuple[str, int, str]:
    """rootfs: ``local-lvm:8`` or ``volume=local-lvm:8,size=8G`` -> (storage, bytes, rest)."""
    parts = value.split(",")
    first = parts[0][len("volume="):] if parts[0].startswith("volume=") else parts[0]
    storage, _, amount = first.partition(":")
    rest = ",".join(p for p in parts[1:] if not p.startswith("size="))
    size = _size_to_bytes(amount) if re.fullmatch(r"\d+(?:\.\d+)?", amount) else 0
    for part in parts[1:]:
        if part.startswith("size="):
            size = _size_to_bytes(part[5:])
    return storage, size or 4 * GiB, rest


def _host_path_mount(key: str, value: Any) -> bool:
    """An LXC ``mpN`` whose volume is a host path (bind or device mount point)."""
    first = str(value).split(",", 1)[0].removeprefix("volume=")
    return key.startswith("mp") and first.startswith("/")


@route("POST", "/nodes/{node}/lxc")
def lxc_create(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    node, vmid = p.pop("node"), int(p.pop("vmid"))
    _check_node(sim, node)
    restore = bool(p.pop("restore", 0))
    force = bool(p.pop("force", 0))
    start = bool(p.pop("start", 0))
    pool = p.pop("pool", None)
    storage_default = p.pop("storage", "local")
    ostemplate = p.pop("ostemplate")
    for secret_key in ("password", "ssh-public-keys", "unique", "ignore-unpack-errors",
                       "bwlimit", "ha-managed"):
        p.pop(secret_key, None)
    who = ctx.principal
    if pool:
        require(who, f"/pool/{pool}", "VM.Allocate")
    else:
        require(who, f"/vms/{vmid}", "VM.Allocate")
    existing = sim.state["guests"].get(str(vmid))
    if existing is not None:
        if not (restore and force):
            _check_unused(sim, vmid)
        if existing["type"] != "lxc" or existing["node"] != node:
            _check_unused(sim, vmid)
        _check_lock(existing)
        if existing["status"] == "running":
            raise _api_error(500, f"unable to restore CT {vmid} - CT is running")
    volume = _find_volume(sim, node, ostemplate)
    if volume is None:
        raise _api_error(500, f"volume '{ostemplate}' does not exist")
    if restore and volume["content"] != "backup":
        raise _api_error(500, f"volume '{ostemplate}' is not a backup archive")
    if not restore and volume["content"] != "vztmpl":
        raise _api_error(500, f"volume '{ostemplate}' is not a container template")
    rootfs_spec = p.pop("rootfs", None)
    if rootfs_spec is None and restore:
        rootfs_spec = volume.get("config", {}).get("rootfs")
        if rootfs_spec:
            rs, size, _ = _parse_rootfs(rootfs_spec)
            rootfs_spec = f"{storage_default if 'storage' in ctx.p else rs}:{size // GiB or 1}"
    rootfs_storage, rootfs_size, rootfs_rest = _parse_rootfs(rootfs_spec or f"{storage_default}:4")
    scfg = _storage(sim, rootfs_storage)
    if not _has_content(scfg, "rootdir"):
        raise _api_error(500, f"storage '{rootfs_storage}' does not support container directories")
    require(who, f"/storage/{rootfs_storage}", "Datastore.AllocateSpace")
    config: dict[str, Any] = {}
    if restore:
        # PVE re-allocates volume mount points but keeps bind and device mount points
        # (a host path) as they were: restoring them needs root, which the lab's token has
        config.update({k: v for k, v in volume.get("config", {}).items()
                       if (not _DISK_KEY.match(k) or _host_path_mount(k, v))
                       and not k.startswith("unused") and k != "lock"})
    else:
        config.update({"arch": "amd64", "ostype": _template_ostype(ostemplate), "memory": 512,
                       "swap": 512, "cores": 1, "hostname": f"CT{vmid}"})
    config.update(p)
    config["lock"] = "create"
    with sim.lock:
        if existing is None:
            _check_unused(sim, vmid)  # PVE creates the config under a cluster lock
        old_rootfs_dir = existing.get("rootfs_dir") if existing else None
        if existing is not None:
            _free_guest_volumes(sim, existing, None)
        guest = new_guest(vmid, "lxc", node, config)
        guest["rootfs_dir"] = old_rootfs_dir
        sim.state["guests"][str(vmid)] = guest
        _add_to_pool(sim, pool, vmid)

    def on_error() -> None:
        with sim.lock:
            _free_guest_volumes(sim, guest, None)
            sim.state["guests"].pop(str(vmid), None)
            _remove_from_pools(sim, vmid)

    def work(run: TaskRun) -> None:
        path = _volume_path(sim, ostemplate)
        if restore:
            run.log(f"recovering backed-up configuration from '{ostemplate}'")
        with sim.lock:
            volname = _next_disk_name(sim, node, rootfs_storage, vmid)
            volid = _alloc(sim, node, rootfs_storage, volname, rootfs_size, vmid, "rootdir")
            guest["config"]["rootfs"] = f"{volid},size={_size_text(rootfs_size)}" + (
                f",{rootfs_rest}" if rootfs_rest else "")
        if scfg["type"] == "lvmthin":
            run.log(f'  Logical volume "{volname}" created.')
        blocks = rootfs_size // 4096
        run.log(f"Creating filesystem with {blocks} 4k blocks and {blocks // 4} inodes")
        run.sleep(0.5)
        message = run.injected_failure()
        if message is not None:
            raise TaskFailed(f"unable to {'restore' if restore else 'create'} CT {vmid} - "
                             f"{message}")
        if restore:
            run.log(f"restoring '{ostemplate}' now..")
        run.log(f"extracting archive '{path}'")
        size = int(volume.get("size", 0))
        if restore:
            _restore_rootfs(sim, guest, volume)
        run.sleep(0.5)
        mib = max(size // 1024**2, 1)
        run.log(f"Total bytes read: {size} ({mib}MiB, {mib}MiB/s)")
        run.log(f"Detected container architecture: {guest['config'].get('arch', 'amd64')}")
        if restore:
            run.log("merging backed-up and given configuration..")
        else:
            for keytype in ("rsa", "ecdsa", "ed25519"):
                run.log(f"Creating SSH host key 'ssh_host_{keytype}_key' - this may take some "
                        "time ...")
                fp = hashlib.sha256(f"{vmid}{keytype}".encode()).hexdigest()[:43]
                run.log(f"done: SHA256:{fp} root@{guest['config'].get('hostname')}")
        with sim.lock:
            guest["config"].pop("lock", None)
            if start:
                guest["status"] = "running"
                guest["started_at"] = time.time()

    return sim.tasks.start(node, "vzrestore" if restore else "vzcreate", vmid, ctx.user, work,
                           vmid=vmid, on_error=on_error)


def _archive_file(sim: Simulator, node: str, volid: str) -> Path:
    storage, volname = _split_volid(volid)
    return sim.data_dir / "storage" / node / storage / volname


def _restore_rootfs(sim: Simulator, guest: dict[str, Any], volume: dict[str, Any]) -> None:
    archive = _archive_file(sim, guest["node"], volume["volid"])
    if not archive.exists():
        return
    with tarfile.open(archive, "r:*") as tar:
        members = [m for m in tar.getmembers() if m.name.startswith("rootfs/") or
                   m.name == "rootfs"]
        has_rootfs = any(m.name == "rootfs" or m.name.startswith("rootfs/") for m in members)
        if not has_rootfs:
            return
        target = Path(guest.get("rootfs_dir") or _sim_dir(sim, "rootfs", str(guest["vmid"])))
        staging = sim.data_dir / "tmp" / f"restore-{guest['vmid']}-{secrets.token_hex(4)}"
        staging.mkdir(parents=True)
        try:
            tar.extractall(staging, members=members, filter="data")
            _replace_dir_contents(target, staging / "rootfs")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        guest["rootfs_dir"] = str(target)


@route("POST", "/nodes/{node}/qemu")
def qemu_create(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    node, vmid = p.pop("node"), int(p.pop("vmid"))
    _check_node(sim, node)
    archive = p.pop("archive", None)
    force = bool(p.pop("force", 0))
    start = bool(p.pop("start", 0))
    pool = p.pop("pool", None)
    target_storage = p.pop("storage", None)
    for key in ("unique", "bwlimit", "live-restore", "ha-managed", "import-working-storage"):
        p.pop(key, None)
    who = ctx.principal
    require(who, f"/pool/{pool}" if pool else f"/vms/{vmid}", "VM.Allocate")
    existing = sim.state["guests"].get(str(vmid))
    if existing is not None:
        if not (archive and force) or existing["type"] != "qemu" or existing["node"] != node:
            _check_unused(sim, vmid)
        _check_lock(existing)
        if existing["status"] == "running":
            raise _api_error(500, f"unable to restore VM {vmid} - VM is running")
    volume = None
    if archive:
        volume = _find_volume(sim, node, archive)
        if volume is None or volume["content"] != "backup":
            raise _api_error(500, f"volume '{archive}' does not exist")
    config: dict[str, Any] = {}
    if volume is not None:
        config.update({k: v for k, v in volume.get("config", {}).items() if k != "lock"})
    config.update(p)
    config["lock"] = "create"
    disk_specs = {k: v for k, v in config.items() if _DISK_KEY.match(k) and k != "rootfs"}
    allocations: list[tuple[str, str, int, str]] = []
    for key, value in disk_specs.items():
        if "media=cdrom" in str(value):
            continue
        first, *rest = str(value).split(",")
        storage, _, amount = first.partition(":")
        size = 0
        if volume is not None:
            storage = target_storage or storage
            match = re.search(r"size=(\d+(?:\.\d+)?[KMGT]?)", str(value))
            size = _size_to_bytes(match.group(1)) if match else 4 * GiB
        elif re.fullmatch(r"\d+(?:\.\d+)?", amount):
            size = _size_to_bytes(amount)
        else:
            continue  # an existing volume is referenced
        scfg = _storage(sim, storage)
        if not _has_content(scfg, "images"):
            raise _api_error(500, f"storage '{storage}' does not support vm images")
        require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
        extra = ",".join(r for r in rest if not r.startswith("size="))
        allocations.append((key, storage, size, extra))
    with sim.lock:
        if existing is None:
            _check_unused(sim, vmid)  # PVE creates the config under a cluster lock
        if existing is not None:
            _free_guest_volumes(sim, existing, None)
        guest = new_guest(vmid, "qemu", node, config)
        sim.state["guests"][str(vmid)] = guest
        _add_to_pool(sim, pool, vmid)

    def on_error() -> None:
        with sim.lock:
            _free_guest_volumes(sim, guest, None)
            sim.state["guests"].pop(str(vmid), None)
            _remove_from_pools(sim, vmid)

    def work(run: TaskRun) -> None:
        if volume is not None:
            path = _volume_path(sim, archive or "")
            tmpdir = f"/var/tmp/vzdumptmp{run.record['pid']}"  # noqa: S108 - log text only
            run.log(f"restore vma archive: zstd -q -d -c {path} | vma extract -v -r "
                    f"{tmpdir}.fifo - {tmpdir}")
            run.log("CFG: size: 496 name: qemu-server.conf")
            for i, (key, _s, size, _e) in enumerate(allocations, start=1):
                run.log(f"DEV: dev_id={i} size: {size} devname: drive-{key}")
            ctime = datetime.fromtimestamp(volume["ctime"])
            run.log(f"CTIME: {ctime.strftime('%a %b %d %H:%M:%S %Y')}")
        for key, storage, size, extra in allocations:
            with sim.lock:
                volname = _next_disk_name(sim, node, storage, vmid)
                volid = _alloc(sim, node, storage, volname, size, vmid, "images")
                guest["config"][key] = f"{volid}" + (f",{extra}" if extra else "") + \
                    f",size={_size_text(size)}"
            if sim.state["storages"][storage]["type"] == "lvmthin":
                run.log(f'  Logical volume "{volname}" created.')
            if volume is not None:
                run.log(f"new volume ID is '{volid}'")
                run.log(f"map 'drive-{key}' to '/dev/pve/{volname}' (write zeros = 0)")
        run.sleep()
        message = run.injected_failure()
        if message is not None:
            raise TaskFailed(f"unable to {'restore' if volume else 'create'} VM {vmid} - "
                             f"{message}")
        if volume is not None:
            total = sum(a[2] for a in allocations)
            run.log(f"progress 100% (read {total} bytes, duration 0 sec)")
            run.log(f"total bytes read {total}, sparse bytes 0 (0%)")
            run.log("space reduction due to 4K zero blocks 0.00%")
            run.log("rescan volumes...")
        with sim.lock:
            guest["config"].pop("lock", None)
            if start:
                guest["status"] = "running"
                guest["started_at"] = time.time()

    return sim.tasks.start(node, "qmrestore" if archive else "qmcreate", vmid, ctx.user, work,
                           vmid=vmid, on_error=on_error)


# ============================================================================ destroy


def _destroy(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = _guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    vmid, label = guest["vmid"], _label(gtype)
    _check_lock(guest)
    if guest["status"] == "running":
        if not (gtype == "lxc" and ctx.p.get("force")):
            raise _api_error(500, f"{label} {vmid} is running - destroy failed")
    if int(guest["config"].get("protection", 0)):
        raise _api_error(500, f"can't remove {label} {vmid} - protection mode enabled")
    purge = bool(ctx.p.get("purge"))
    _set_lock(sim, guest, "destroyed")

    def work(run: TaskRun) -> None:
        run.sleep()
        run.check_injected()
        with sim.lock:
            _free_guest_volumes(sim, guest, run)
            sim.state["guests"].pop(str(vmid), None)
            _remove_from_pools(sim, vmid)
            if purge:
                for job in sim.state["backup_jobs"].values():
                    ids = [v for v in re.split(r"[,;\s]+", str(job.get("vmid", ""))) if v]
                    if str(vmid) in ids:
                        ids.remove(str(vmid))
                        job["vmid"] = ",".join(ids)
        rootfs = guest.get("rootfs_dir")
        if rootfs:
            shutil.rmtree(rootfs, ignore_errors=True)
        shutil.rmtree(sim.data_dir / "snapshots" / str(vmid), ignore_errors=True)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}destroy", vmid, ctx.user, work, vmid=vmid,
                           on_error=_unlock_cb(sim, guest))


@route("DELETE", "/nodes/{node}/lxc/{vmid}")
def lxc_destroy(ctx: Ctx) -> Any:
    return _destroy(ctx, "lxc")


@route("DELETE", "/nodes/{node}/qemu/{vmid}")
def qemu_destroy(ctx: Ctx) -> Any:
    return _destroy(ctx, "qemu")


# ============================================================================ resize


def _resize(ctx: Ctx, gtype: str) -> str:
    """``PUT .../resize``: grow a disk (``size`` absolute or ``+delta``); never shrink."""
    sim, p = ctx.sim, ctx.p
    guest = _guest(sim, p["node"], p["vmid"], gtype)
    vmid, disk = guest["vmid"], str(p["disk"])
    _check_lock(guest, bool(p.get("skiplock")))
    if p.get("digest") and p["digest"] != _digest(guest["config"]):
        raise _api_error(500, "detected modified configuration - file changed by other user? "
                              "Try again.")
    value = guest["config"].get(disk)
    if value is None or disk not in _disk_volids(guest["config"]):
        raise _api_error(500, f"unable to parse volume ID '{disk}'" if value is None
                         else f"disk '{disk}' is not a volume")
    volid = _disk_volids(guest["config"])[disk]
    match = re.search(r"size=(\d+(?:\.\d+)?[KMGT]?)", str(value))
    current = _size_to_bytes(match.group(1)) if match else 0
    text = str(p["size"])
    new = current + _size_to_bytes(text[1:]) if text.startswith("+") else _size_to_bytes(text)
    if new < current:
        raise _api_error(500, "shrinking disks is not supported")
    storage = volid.split(":", 1)[0]
    if sim.faults.is_full(storage, guest["node"]):
        raise _api_error(500, f"unable to resize '{volid}' - No space left on device")

    def work(run: TaskRun) -> None:
        run.log(f"  Size of logical volume {volid} changed from {_size_text(current)} to "
                f"{_size_text(new)}.")
        run.sleep(0.5)
        run.check_injected()
        with sim.lock:
            cfg_value = str(guest["config"].get(disk, ""))
            if "size=" in cfg_value:
                cfg_value = re.sub(r"size=[^,]+", f"size={_size_text(new)}", cfg_value)
            else:
                cfg_value += f",size={_size_text(new)}"
            guest["config"][disk] = cfg_value
            vol = _volumes(sim, guest["node"], storage).get(volid)
            if vol is not None:
                vol["size"] = new

    return sim.tasks.start(guest["node"], "resize", vmid, ctx.user, work, vmid=vmid)


@route("PUT", "/nodes/{node}/lxc/{vmid}/resize")
def lxc_resize(ctx: Ctx) -> Any:
    return _resize(ctx, "lxc")


@route("PUT", "/nodes/{node}/qemu/{vmid}/resize")
def qemu_resize(ctx: Ctx) -> Any:
    return _resize(ctx, "qemu")


# ============================================================================ snapshots


def _snap_list(ctx: Ctx, gtype: str) -> Any:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    out = []
    for name, snap in guest["snapshots"].items():
        entry = {"name": name, "snaptime": snap["snaptime"],
                 "description": snap.get("description", "")}
        if snap.get("parent"):
            entry["parent"] = snap["parent"]
        if gtype == "qemu":
            entry["vmstate"] = 0
        out.append(entry)
    current: dict[str, Any] = {"name": "current", "description": "You are here!",
                               "running": 1 if guest["status"] == "running" else 0}
    if guest.get("parent"):
        current["parent"] = guest["parent"]
    out.append(current)
    return out


def _snap_create(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = _guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    name = ctx.p["snapname"]
    vmid = guest["vmid"]
    _check_lock(guest)
    if name == "current":
        raise _api_error(500, "invalid snapshot name 'current'")
    if name in guest["snapshots"]:
        raise _api_error(500, f"snapshot name '{name}' already used")
    if not _snapshot_capable(sim, guest["config"]):
        raise _api_error(500, "snapshot feature is not available")
    _set_lock(sim, guest, "snapshot")
    description = ctx.p.get("description", "")

    def work(run: TaskRun) -> None:
        if gtype == "lxc":
            run.log("()")
        for volid in _disk_volids(guest["config"]).values():
            volname = volid.split(":", 1)[1].split("/")[-1]
            if "cloudinit" not in volname:
                run.log(f'  Logical volume "snap_{volname}_{name}" created.')
        run.sleep()
        run.check_injected()
        rootfs = guest.get("rootfs_dir")
        if rootfs and Path(rootfs).exists():
            target = sim.data_dir / "snapshots" / str(vmid) / name
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(rootfs, target, symlinks=True)
        with sim.lock:
            cfg = {k: v for k, v in guest["config"].items() if k != "lock"}
            guest["snapshots"][name] = {"snaptime": int(time.time()), "config": cfg,
                                        "parent": guest.get("parent"),
                                        "description": description}
            guest["parent"] = name
            guest["config"].pop("lock", None)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}snapshot", vmid, ctx.user, work, vmid=vmid,
                           on_error=_unlock_cb(sim, guest))


def _snap_get(ctx: Ctx, gtype: str) -> Any:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    if ctx.p["snapname"] not in guest["snapshots"]:
        raise _api_error(500, f"snapshot '{ctx.p['snapname']}' does not exist")
    return [{"subdir": "rollback"}, {"subdir": "config"}]


def _snap_config(ctx: Ctx, gtype: str) -> Any:
    guest = _guest(ctx.sim, ctx.p["node"], ctx.p["vmid"], gtype)
    return _config_out(guest, ctx.p["snapname"])


def _snap_rollback(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = _guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    name, vmid = ctx.p["snapname"], guest["vmid"]
    _check_lock(guest)
    if name not in guest["snapshots"]:
        raise _api_error(500, f"snapshot '{name}' does not exist")
    start_after = bool(ctx.p.get("start"))
    _set_lock(sim, guest, "rollback")

    def work(run: TaskRun) -> None:
        if guest["status"] == "running":
            with sim.lock:
                guest["status"] = "stopped"
                guest["started_at"] = None
        run.sleep()
        run.check_injected()
        snap_copy = sim.data_dir / "snapshots" / str(vmid) / name
        rootfs = guest.get("rootfs_dir")
        if rootfs and snap_copy.exists():
            _replace_dir_contents(Path(rootfs), snap_copy)
        with sim.lock:
            guest["config"] = copy.deepcopy(guest["snapshots"][name]["config"])
            guest["parent"] = name
            if start_after:
                guest["status"] = "running"
                guest["started_at"] = time.time()

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}rollback", vmid, ctx.user, work, vmid=vmid,
                           on_error=_unlock_cb(sim, guest))


def _snap_delete(ctx: Ctx, gtype: str) -> str:
    sim = ctx.sim
    guest = _guest(sim, ctx.p["node"], ctx.p["vmid"], gtype)
    name, vmid = ctx.p["snapname"], guest["vmid"]
    if not ctx.p.get("force"):
        _check_lock(guest)
    if name not in guest["snapshots"]:
        raise _api_error(500, f"snapshot '{name}' does not exist")
    _set_lock(sim, guest, "snapshot-delete")

    def work(run: TaskRun) -> None:
        for volid in _disk_volids(guest["snapshots"][name]["config"]).values():
            volname = volid.split(":", 1)[1].split("/")[-1]
            if "cloudinit" not in volname:
                run.log(f'  Logical volume "snap_{volname}_{name}" successfully removed.')
        run.sleep()
        run.check_injected()
        with sim.lock:
            snap = guest["snapshots"].pop(name)
            for other in guest["snapshots"].values():
                if other.get("parent") == name:
                    other["parent"] = snap.get("parent")
            if guest.get("parent") == name:
                guest["parent"] = snap.get("parent")
            guest["config"].pop("lock", None)
        shutil.rmtree(sim.data_dir / "snapshots" / str(vmid) / name, ignore_errors=True)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(guest["node"], f"{prefix}delsnapshot", vmid, ctx.user, work,
                           vmid=vmid, on_error=_unlock_cb(sim, guest))


for _gtype in ("lxc", "qemu"):
    _base = f"/nodes/{{node}}/{_gtype}/{{vmid}}/snapshot"
    ROUTES[("GET", _base)] = lambda ctx, _g=_gtype: _snap_list(ctx, _g)
    ROUTES[("POST", _base)] = lambda ctx, _g=_gtype: _snap_create(ctx, _g)
    ROUTES[("GET", _base + "/{snapname}")] = lambda ctx, _g=_gtype: _snap_get(ctx, _g)
    ROUTES[("DELETE", _base + "/{snapname}")] = lambda ctx, _g=_gtype: _snap_delete(ctx, _g)
    ROUTES[("GET", _base + "/{snapname}/config")] = lambda ctx, _g=_gtype: _snap_config(ctx, _g)
    ROUTES[("POST", _base + "/{snapname}/rollback")] = (
        lambda ctx, _g=_gtype: _snap_rollback(ctx, _g)
    )


# ============================================================================ clone


def _clone(ctx: Ctx, gtype: str) -> str:
    sim, p = ctx.sim, ctx.p
    source = _guest(sim, p["node"], p["vmid"], gtype)
    newid = int(p["newid"])
    label = _label(gtype)
    if str(newid) in sim.state["guests"]:
        raise _api_error(500, f"unable to create {label} {newid}: config file already exists")
    is_template = bool(int(source["config"].get("template", 0)))
    if not is_template:
        _check_lock(source)
    full = bool(p["full"]) if "full" in p else not is_template
    if not full and not is_template:
        raise _api_error(500, "clone_image only works on base images")
    if p.get("storage") and not full:
        raise _api_error(500, "parameter 'storage' not allowed for linked clones")
    target = p.get("target") or source["node"]
    _check_node(sim, target)
    if target != source["node"]:
        for volid in _disk_volids(source["config"]).values():
            storage = volid.split(":", 1)[0]
            if not sim.state["storages"][storage].get("shared"):
                raise _api_error(500, f"can't clone {label} to node '{target}' "
                                 f"({label} uses local storage)")
    snapname = p.get("snapname")
    src_config = source["snapshots"][snapname]["config"] if snapname and \
        snapname in source["snapshots"] else source["config"]
    if snapname and snapname not in source["snapshots"]:
        raise _api_error(500, f"snapshot '{snapname}' does not exist")
    pool = p.get("pool")
    if pool and pool not in sim.state["pools"]:
        raise _api_error(500, f"pool '{pool}' does not exist")
    config = {k: v for k, v in src_config.items() if k not in ("template", "lock", "parent")}
    name_key = "hostname" if gtype == "lxc" else "name"
    config[name_key] = p.get(name_key) or p.get("name") or (
        f"Copy-of-VM-{_guest_name(source)}" if gtype == "qemu" else _guest_name(source))
    for key in list(config):
        if re.fullmatch(r"net\d+", key):
            value = str(config[key])
            if gtype == "qemu":
                config[key] = re.sub(r"=([0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5})", f"={_mac()}",
                                     value, count=1)
            else:
                config[key] = re.sub(r"hwaddr=[0-9A-Fa-f:]+", f"hwaddr={_mac()}", value)
    config["lock"] = "clone"
    disks = {k: v for k, v in _disk_volids(src_config).items() if not k.startswith("unused")}
    for key in [k for k in config if re.fullmatch(r"unused\d+", k)]:
        del config[key]
    with sim.lock:
        if str(newid) in sim.state["guests"]:  # PVE creates the config under a cluster lock
            raise _api_error(500, f"unable to create {label} {newid}: config file already exists")
        guest = new_guest(newid, gtype, target, config)
        sim.state["guests"][str(newid)] = guest
        if pool:
            _add_to_pool(sim, pool, newid)

    def on_error() -> None:
        with sim.lock:
            _free_guest_volumes(sim, guest, None)
            sim.state["guests"].pop(str(newid), None)
            _remove_from_pools(sim, newid)

    def work(run: TaskRun) -> None:
        for key, volid in disks.items():
            storage, volname = volid.split(":", 1)
            base = volname.split("/")[-1]
            if "cloudinit" in base:
                with sim.lock:
                    new_volid = _alloc(sim, target, storage, f"vm-{newid}-cloudinit", 4 * 1024**2,
                                       newid, "images")
                    guest["config"][key] = f"{new_volid},media=cdrom"
                continue
            src_vol = _volumes(sim, source["node"], storage).get(volid, {})
            size = int(src_vol.get("size", 4 * GiB))
            kind = "full" if full else "linked"
            run.log(f"create {kind} clone of drive {key} ({volid})")
            dest_storage = p.get("storage") or storage
            with sim.lock:
                new_name = _next_disk_name(sim, target, dest_storage, newid)
                if full:
                    new_volid = _alloc(sim, target, dest_storage, new_name, size, newid, "images")
                else:
                    new_volid = _alloc(sim, target, storage, f"{base}/{new_name}", size, newid,
                                       "images")
                rest = ",".join(part for part in str(src_config[key]).split(",")[1:]
                                if not part.startswith("size="))
                guest["config"][key] = new_volid + (f",{rest}" if rest else "") + \
                    f",size={_size_text(size)}"
            run.log(f'  Logical volume "{new_name}" created.')
            if full:
                human = f"{size / GiB:.1f} GiB"
                run.log(f"transferred {human} of {human} (100.00%)")
        run.sleep()
        run.check_injected()
        src_dir = source.get("rootfs_dir")
        if gtype == "lxc" and src_dir and Path(src_dir).exists():
            dest = sim.data_dir / "rootfs" / str(newid)
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(src_dir, dest, symlinks=True)
            guest["rootfs_dir"] = str(dest)
        with sim.lock:
            guest["config"].pop("lock", None)

    prefix = "vz" if gtype == "lxc" else "qm"
    return sim.tasks.start(source["node"], f"{prefix}clone", source["vmid"], ctx.user, work,
                           vmid=source["vmid"], on_error=on_error)


@route("POST", "/nodes/{node}/qemu/{vmid}/clone")
def qemu_clone(ctx: Ctx) -> Any:
    return _clone(ctx, "qemu")


@route("POST", "/nodes/{node}/lxc/{vmid}/clone")
def lxc_clone(ctx: Ctx) -> Any:
    return _clone(ctx, "lxc")


# ============================================================================ tasks


@route("GET", "/nodes/{node}/tasks")
def tasks_list(ctx: Ctx) -> Any:
    p = ctx.p
    _check_node(ctx.sim, p["node"])
    source = p.get("source", "archive")
    out = []
    for task in reversed(ctx.sim.state["tasks"]):
        if task["node"] != p["node"]:
            continue
        running = task["status"] == "running"
        if (source == "archive" and running) or (source == "active" and not running):
            continue
        if p.get("vmid") is not None and task["id"] != str(p["vmid"]):
            continue
        if p.get("typefilter") and task["type"] != p["typefilter"]:
            continue
        if p.get("userfilter") and p["userfilter"] not in task["user"]:
            continue
        if p.get("errors") and task.get("exitstatus") in ("OK", None):
            continue
        if p.get("since") and task["starttime"] < p["since"]:
            continue
        if p.get("until") and task["starttime"] > p["until"]:
            continue
        entry = {k: task[k] for k in ("upid", "node", "pid", "pstart", "starttime", "type", "id",
                                      "user")}
        if not running:
            entry["status"] = task["exitstatus"]
            entry["endtime"] = task["endtime"]
        out.append(entry)
    start = int(p.get("start", 0))
    limit = int(p.get("limit", 50))
    return out[start:start + limit]


def _task(ctx: Ctx) -> dict[str, Any]:
    upid = ctx.p["upid"]
    parsed = parse_upid(upid)
    if parsed is None:
        raise _api_error(400, "Parameter verification failed.",
                         {"upid": "unable to parse worker upid"})
    if parsed["node"] != ctx.p["node"]:
        raise _api_error(500, f"no such task '{upid}'")
    task = ctx.sim.tasks.find(upid)
    if task is None:
        raise _api_error(500, f"no such task '{upid}'")
    user = ctx.user
    if ctx.who is not None and not ctx.who.unlimited and task["user"] != user and \
            task["user"] != user.split("!")[0] and not ctx.principal.has(
                f"/nodes/{task['node']}", "Sys.Audit"):
        raise PermissionDenied(f"Permission check failed (/nodes/{task['node']}, Sys.Audit)")
    return task


@route("GET", "/nodes/{node}/tasks/{upid}")
def task_index(ctx: Ctx) -> Any:
    _task(ctx)
    return [{"name": "log"}, {"name": "status"}]


@route("GET", "/nodes/{node}/tasks/{upid}/status")
def task_status(ctx: Ctx) -> Any:
    task = _task(ctx)
    out = {k: task[k] for k in ("upid", "node", "pid", "pstart", "starttime", "type", "id",
                                "user", "status")}
    if task["status"] == "stopped":
        out["exitstatus"] = task["exitstatus"]
    return out


@route("GET", "/nodes/{node}/tasks/{upid}/log")
def task_log(ctx: Ctx) -> Any:
    task = _task(ctx)
    with ctx.sim.lock:
        lines = list(task["log"])
    if not lines:
        return [{"n": 1, "t": "no content"}]
    start = int(ctx.p.get("start", 0))
    limit = int(ctx.p.get("limit", 50))
    return [{"n": i + 1, "t": text} for i, text in enumerate(lines)][start:start + limit]


@route("DELETE", "/nodes/{node}/tasks/{upid}")
def task_stop(ctx: Ctx) -> Any:
    task = _task(ctx)
    if task["status"] == "running":
        ctx.sim.tasks.stop_task(task["upid"])
    return None


# ============================================================================ storage


def _storage_entry(sim: Simulator, node: str, sid: str) -> dict[str, Any]:
    cfg = sim.state["storages"][sid]
    used = _storage_used(sim, node, sid)
    total = int(cfg["total"])
    avail = 0 if sim.faults.is_full(sid, node) else max(total - used, 0)
    if sim.faults.is_full(sid, node):
        used = total
    return {
        "storage": sid, "type": cfg["type"], "content": cfg["content"], "active": 1,
        "enabled": 1, "shared": int(cfg.get("shared", 0)), "total": total, "used": used,
        "avail": avail, "used_fraction": round(used / total, 6) if total else 0.0,
    }


@route("GET", "/nodes/{node}/storage")
def storage_list(ctx: Ctx) -> Any:
    sim, p = ctx.sim, ctx.p
    _check_node(sim, p["node"])
    wanted = set(re.split(r"[,;\s]+", p["content"])) if p.get("content") else None
    out = []
    for sid in sorted(sim.state["storages"]):
        if p.get("storage") and p["storage"] != sid:
            continue
        cfg = sim.state["storages"][sid]
        if wanted and not wanted & set(cfg["content"].split(",")):
            continue
        if not ctx.principal.has(f"/storage/{sid}", "Datastore.Audit") and not \
                ctx.principal.has(f"/storage/{sid}", "Datastore.AllocateSpace"):
            continue
        out.append(_storage_entry(sim, p["node"], sid))
    return out


@route("GET", "/nodes/{node}/storage/{storage}")
def storage_index(ctx: Ctx) -> Any:
    _check_node(ctx.sim, ctx.p["node"])
    _storage(ctx.sim, ctx.p["storage"])
    return [{"subdir": s} for s in ("content", "prunebackups", "status")]


@route("GET", "/nodes/{node}/storage/{storage}/status")
def storage_status(ctx: Ctx) -> Any:
    _check_node(ctx.sim, ctx.p["node"])
    _storage(ctx.sim, ctx.p["storage"])
    entry = _storage_entry(ctx.sim, ctx.p["node"], ctx.p["storage"])
    del entry["storage"], entry["used_fraction"]
    return entry


def _content_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out = {k: entry[k] for k in ("volid", "content", "format", "size", "ctime") if k in entry}
    for key in ("vmid", "notes", "subtype"):
        if entry.get(key) not in (None, ""):
            out[key] = entry[key]
    if entry["content"] == "backup":
        out["protected"] = int(entry.get("protected", 0))
    if entry["content"] in ("images", "rootdir"):
        out["used"] = entry["size"] // 4
        if "/" in entry["volid"].split(":", 1)[1]:
            out["parent"] = entry["volid"].split(":", 1)[1].split("/")[0]
    return out


@route("GET", "/nodes/{node}/storage/{storage}/content")
def storage_content(ctx: Ctx) -> Any:
    sim, p = ctx.sim, ctx.p
    _check_node(sim, p["node"])
    out = []
    for entry in sorted(_volumes(sim, p["node"], p["storage"]).values(),
                        key=lambda e: e["volid"]):
        if p.get("content") and entry["content"] != p["content"]:
            continue
        if p.get("vmid") is not None and entry.get("vmid") != p["vmid"]:
            continue
        out.append(_content_entry(entry))
    return out


def _content_volume(ctx: Ctx) -> dict[str, Any]:
    sim, p = ctx.sim, ctx.p
    _check_node(sim, p["node"])
    volume = p["volume"]
    storage = p["storage"]
    volid = volume if ":" in volume else f"{storage}:{volume}"
    vstorage, _ = _split_volid(volid)
    entry = _volumes(sim, p["node"], vstorage).get(volid)
    if entry is None:
        raise _api_error(500, f"volume '{volid}' does not exist")
    return entry


@route("GET", "/nodes/{node}/storage/{storage}/content/{volume}")
def storage_volume_get(ctx: Ctx) -> Any:
    entry = _content_volume(ctx)
    require(ctx.principal, f"/storage/{entry['volid'].split(':')[0]}", "Datastore.Audit",
            "Datastore.AllocateSpace", any_of=True)
    out = {"format": entry["format"], "size": entry["size"], "used": entry["size"],
           "path": _volume_path(ctx.sim, entry["volid"], ctx.p["node"]),
           "protected": int(entry.get("protected", 0))}
    if entry.get("notes"):
        out["notes"] = entry["notes"]
    return out


def _check_backup_access(who: Principal, entry: dict[str, Any]) -> None:
    storage = entry["volid"].split(":")[0]
    if who.has(f"/storage/{storage}", "Datastore.Allocate"):
        return
    require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
    if entry["content"] == "backup" and entry.get("vmid") is not None:
        require(who, f"/vms/{entry['vmid']}", "VM.Backup")
    else:
        require(who, f"/storage/{storage}", "Datastore.Allocate")


@route("PUT", "/nodes/{node}/storage/{storage}/content/{volume}")
def storage_volume_put(ctx: Ctx) -> Any:
    entry = _content_volume(ctx)
    _check_backup_access(ctx.principal, entry)
    with ctx.sim.lock:
        if "notes" in ctx.p:
            entry["notes"] = ctx.p["notes"]
        if "protected" in ctx.p:
            entry["protected"] = int(ctx.p["protected"])
    return None


@route("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}")
def storage_volume_delete(ctx: Ctx) -> Any:
    sim = ctx.sim
    entry = _content_volume(ctx)
    _check_backup_access(ctx.principal, entry)
    volid = entry["volid"]
    if entry.get("protected"):
        raise _api_error(500, f"volume '{volid}' is protected")
    if entry["content"] in ("images", "rootdir"):
        guest = sim.state["guests"].get(str(entry.get("vmid")))
        if guest is not None and volid in _disk_volids(guest["config"]).values():
            raise _api_error(500, f"volume '{volid}' is in use by {_label(guest['type'])} "
                                  f"{guest['vmid']}")
    node = ctx.p["node"]

    def work(run: TaskRun) -> None:
        run.sleep(0.25)
        run.check_injected()
        with sim.lock:
            _volumes(sim, node, volid.split(":")[0]).pop(volid, None)
        _archive_file(sim, node, volid).unlink(missing_ok=True)
        if entry["content"] == "backup":
            run.log(f"Removed volume '{volid}'")

    return sim.tasks.start(node, "imgdel", volid, ctx.user, work)


def _retention(sim: Simulator, storage: str, given: str | None) -> dict[str, int]:
    text = given or sim.state["storages"][storage].get("prune-backups") or "keep-all=1"
    return prune.parse_retention(text)


def _prune_list(ctx: Ctx) -> list[dict[str, Any]]:
    sim, p = ctx.sim, ctx.p
    _check_node(sim, p["node"])
    backups = [e for e in _volumes(sim, p["node"], p["storage"]).values()
               if e["content"] == "backup"]
    if p.get("vmid") is not None:
        backups = [b for b in backups if b.get("vmid") == p["vmid"]]
    if p.get("type"):
        backups = [b for b in backups if b.get("subtype") == p["type"]]
    return prune.prune_marks(backups, _retention(sim, p["storage"], p.get("prune-backups")))


@route("GET", "/nodes/{node}/storage/{storage}/prunebackups")
def prune_dryrun(ctx: Ctx) -> Any:
    return _prune_list(ctx)


@route("DELETE", "/nodes/{node}/storage/{storage}/prunebackups")
def prune_delete(ctx: Ctx) -> Any:
    sim, p = ctx.sim, ctx.p
    who = ctx.principal
    storage = p["storage"]
    if not who.has(f"/storage/{storage}", "Datastore.Allocate"):
        require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
        if p.get("vmid") is None:
            require(who, f"/storage/{storage}", "Datastore.Allocate")
        require(who, f"/vms/{p['vmid']}", "VM.Backup")
    marks = _prune_list(ctx)
    node = p["node"]
    retention = prune.format_retention(_retention(sim, storage, p.get("prune-backups")))

    def work(run: TaskRun) -> None:
        run.log(f"prune backups with retention: {retention}")
        run.sleep(0.5)
        run.check_injected()
        for entry in marks:
            if entry["mark"] == "remove":
                with sim.lock:
                    _volumes(sim, node, storage).pop(entry["volid"], None)
                _archive_file(sim, node, entry["volid"]).unlink(missing_ok=True)
                run.log(f"removing backup '{entry['volid']}'")

    tid = f"{storage}" if p.get("vmid") is None else f"{storage}:{p['vmid']}"
    return sim.tasks.start(node, "prunebackups", tid, ctx.user, work)


# ============================================================================ vzdump


def _vmid_list(text: str | None) -> list[int]:
    return [int(v) for v in re.split(r"[,;\s]+", text or "") if v]


def _vzdump_lock(sim: Simulator, node: str) -> threading.Lock:
    with sim.lock:
        return sim._vzdump_locks.setdefault(node, threading.Lock())


def _render_notes(template: str, guest: dict[str, Any], sim: Simulator) -> str:
    values = {"guestname": _guest_name(guest), "vmid": str(guest["vmid"]),
              "node": guest["node"], "cluster": sim.cluster_name}
    out = template
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("\\n", "\n")


def _cmdline(p: dict[str, Any]) -> str:
    parts = ["vzdump"]
    if p.get("vmid"):
        parts.append(" ".join(str(v) for v in _vmid_list(p["vmid"])))
    for key, value in p.items():
        if key in ("vmid", "node"):
            continue
        text = str(value)
        if re.search(r"[\s'{}]", text):
            text = "'" + text.replace("'", "'\\''") + "'"
        parts.append(f"--{key} {text}")
    parts.append(f"--node {p['node']}")
    return " ".join(parts)


@route("POST", "/nodes/{node}/vzdump")
def vzdump(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    node = p["node"]
    _check_node(sim, node)
    who = ctx.principal
    if p.get("stdout"):
        raise _api_error(501, "vzdump --stdout is not implemented by the labkeeper Proxmox VE "
                              "simulator")
    if p.get("dumpdir"):
        raise _api_error(501, "vzdump --dumpdir is not implemented by the labkeeper Proxmox VE "
                              "simulator")
    storage = p.get("storage", "local")
    scfg = _storage(sim, storage)
    if not _has_content(scfg, "backup"):
        raise _api_error(500, f"storage '{storage}' does not support backups")
    require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
    if not p.get("vmid") and not p.get("all") and not p.get("pool"):
        raise _api_error(500, "No guest selected for backup. Set 'vmid', 'pool' or 'all'.")
    guests = sim.state["guests"]
    if p.get("all"):
        selected = sorted(int(v) for v in guests)
    elif p.get("pool"):
        pool = sim.state["pools"].get(p["pool"])
        if pool is None:
            raise _api_error(500, f"pool '{p['pool']}' does not exist")
        selected = sorted(pool.get("vms", []))
    else:
        selected = _vmid_list(p.get("vmid"))
    excluded = set(_vmid_list(p.get("exclude")))
    selected = [v for v in selected if v not in excluded]
    for vmid in selected:
        if str(vmid) not in guests and not p.get("all"):
            raise _api_error(500, f"unable to find VM {vmid}")
        require(who, f"/vms/{vmid}", "VM.Backup")
    local = [v for v in selected if guests[str(v)]["node"] == node]
    external = [v for v in selected if guests[str(v)]["node"] != node]
    if p.get("all") and p.get("vmid") is None:
        external = []
    mode = p.get("mode", "snapshot")
    compress = p.get("compress", "0")
    retention_text = p.get("prune-backups") or scfg.get("prune-backups")
    remove = int(p.get("remove", 1))
    tid = str(selected[0]) if len(selected) == 1 and not p.get("all") else ""
    cmdline = _cmdline({k: v for k, v in ctx.p.items()})

    def work(run: TaskRun) -> None:
        lock = _vzdump_lock(sim, node)
        if not lock.acquire(blocking=False):
            run.log("INFO: trying to get global lock - waiting...")
            deadline = time.monotonic() + int(p.get("lockwait", 180)) * 60
            while not lock.acquire(timeout=0.05):
                if run.stop_event.is_set():
                    raise TaskFailed("interrupted by signal")
                if time.monotonic() > deadline:
                    raise TaskFailed("can't acquire lock '/var/run/vzdump.lock' - got timeout")
            run.log("INFO: got global lock")
        try:
            run.log(f"INFO: starting new backup job: {cmdline}")
            if external:
                run.log(f"INFO: skip external VMs: {', '.join(map(str, external))}")
            errors = 0
            for vmid in local:
                if not _backup_one(sim, run, node, vmid, storage, mode, compress, p,
                                   retention_text if remove else None):
                    errors += 1
            if errors:
                run.log("INFO: Backup job finished with errors")
                raise TaskFailed("job errors")
            run.log("INFO: Backup job finished successfully")
        finally:
            lock.release()

    return sim.tasks.start(node, "vzdump", tid, ctx.user, work,
                           vmid=selected[0] if len(selected) == 1 else None)


def _backup_one(
    sim: Simulator,
    run: TaskRun,
    node: str,
    vmid: int,
    storage: str,
    mode: str,
    compress: str,
    p: dict[str, Any],
    retention_text: str | None,
) -> bool:
    guest = sim.state["guests"].get(str(vmid))
    gtype = guest["type"] if guest else "qemu"
    run.log(f"INFO: Starting Backup of VM {vmid} ({gtype})")
    started = time.time()
    stamp = datetime.fromtimestamp(started)
    run.log(f"INFO: Backup started at {stamp.strftime('%Y-%m-%d %H:%M:%S')}")

    def fail(message: str) -> bool:
        run.log(f"ERROR: Backup of VM {vmid} failed - {message}")
        run.log(f"INFO: Failed at {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
        return False

    if guest is None:
        return fail(f"unable to find configuration file for VM {vmid} on node '{node}'")
    with sim.lock:
        lock = guest["config"].get("lock")
        if lock:
            return fail(f"{_label(gtype)} is locked ({lock})")
        guest["config"]["lock"] = "backup"
    try:
        return _backup_locked(sim, run, node, guest, storage, mode, compress, p,
                              retention_text, started, fail)
    finally:
        with sim.lock:
            if guest["config"].get("lock") == "backup":
                guest["config"].pop("lock", None)


def _backup_locked(
    sim: Simulator,
    run: TaskRun,
    node: str,
    guest: dict[str, Any],
    storage: str,
    mode: str,
    compress: str,
    p: dict[str, Any],
    retention_text: str | None,
    started: float,
    fail: Callable[[str], bool],
) -> bool:
    vmid, gtype = guest["vmid"], guest["type"]
    running = guest["status"] == "running"
    run.log(f"INFO: status = {guest['status']}")
    if gtype == "lxc":
        run.log(f"INFO: CT Name: {_guest_name(guest)}")
        run.log("INFO: including mount point rootfs ('/') in backup")
    else:
        run.log(f"INFO: VM Name: {_guest_name(guest)}")
        for key, volid in _disk_volids(guest["config"]).items():
            if "cloudinit" in volid or key.startswith("unused"):
                continue
            match = re.search(r"size=(\S+?)(?:,|$)", str(guest["config"][key]))
            run.log(f"INFO: include disk '{key}' '{volid}' {match.group(1) if match else ''}")
    if mode == "snapshot" and gtype == "lxc" and not _snapshot_capable(sim, guest["config"]):
        run.log("INFO: mode failure - some volumes do not support snapshots")
        run.log("INFO: trying 'suspend' mode instead")
        mode = "suspend"
    run.log(f"INFO: backup mode: {mode}")
    run.log(f"INFO: ionice priority: {p.get('ionice', 7)}")
    if mode == "stop" and running:
        run.log("INFO: stopping virtual guest")
    if mode == "snapshot" and gtype == "lxc":
        run.log("INFO: create storage snapshot 'vzdump'")
    ext = BACKUP_EXT[gtype]
    if compress in ("0", ""):
        ext = ext.rsplit(".", 1)[0]
    elif compress in ("gzip", "1"):
        ext = ext.rsplit(".", 1)[0] + ".gz"
    elif compress == "lzo":
        ext = ext.rsplit(".", 1)[0] + ".lzo"
    with sim.lock:
        ts = int(started)
        while True:
            stamp = datetime.fromtimestamp(ts).strftime("%Y_%m_%d-%H_%M_%S")
            filename = f"vzdump-{gtype}-{vmid}-{stamp}.{ext}"
            volid = f"{storage}:backup/{filename}"
            if volid not in _volumes(sim, node, storage):
                break
            ts += 1
    path = _volume_path(sim, volid, node)
    run.log(f"INFO: creating vzdump archive '{path}'")
    run.sleep()
    if sim.faults.is_full(storage, node):
        run.log("INFO: zstd: error 70 : Write error : cannot write block : No space left on "
                "device")
        if gtype == "lxc":
            if mode == "snapshot":
                run.log("INFO: cleanup temporary 'vzdump' snapshot")
            return fail(f"command 'set -o pipefail && tar cpf - --totals --one-file-system -p "
                        f"--sparse --numeric-owner --acls --xattrs ./ | zstd --rsyncable "
                        f"'--threads=1' >{path[:-len(ext)]}dat' failed: exit code 70")
        return fail("vma_queue_write: write error - Broken pipe")
    message = run.injected_failure()
    if message is not None:
        if mode == "snapshot" and gtype == "lxc":
            run.log("INFO: cleanup temporary 'vzdump' snapshot")
        return fail(message)
    archive = _archive_file(sim, node, volid)
    archive.parent.mkdir(parents=True, exist_ok=True)
    _write_archive(archive, guest)
    size = archive.stat().st_size
    if gtype == "lxc":
        written = max(size, 10240)
        run.log(f"INFO: Total bytes written: {written} ({max(written // 1024**2, 1)}MiB, "
                f"{max(written // 1024**2, 1)}MiB/s)")
    else:
        run.log(f"INFO: transferred {size / 1024:.2f} KiB in <1 seconds")
    run.log(f"INFO: archive file size: {_human_size(size)}")
    notes = _render_notes(p["notes-template"], guest, sim) if p.get("notes-template") else ""
    entry = {
        "volid": volid, "content": "backup", "format": ext, "size": size, "ctime": ts,
        "vmid": vmid, "subtype": gtype, "notes": notes, "protected": int(p.get("protected", 0)),
        "config": {k: v for k, v in guest["config"].items() if k != "lock"},
    }
    if notes:
        run.log("INFO: adding notes to backup")
    if entry["protected"]:
        run.log("INFO: marking backup as protected")
    with sim.lock:
        _volumes(sim, node, storage)[volid] = entry
    if mode == "snapshot" and gtype == "lxc":
        run.log("INFO: cleanup temporary 'vzdump' snapshot")
    if mode == "stop" and running:
        run.log("INFO: restarting vm")
        run.log("INFO: guest is online again after <1 seconds")
    if retention_text:
        keep = prune.parse_retention(retention_text)
        if not keep.get("keep-all"):
            run.log(f"INFO: prune older backups with retention: {retention_text}")
            with sim.lock:
                group = [e for e in _volumes(sim, node, storage).values()
                         if e["content"] == "backup" and e.get("vmid") == vmid
                         and e.get("subtype") == gtype]
                marks = prune.prune_marks(group, keep)
                removed = 0
                for mark in marks:
                    if mark["mark"] == "remove":
                        _volumes(sim, node, storage).pop(mark["volid"], None)
                        _archive_file(sim, node, mark["volid"]).unlink(missing_ok=True)
                        run.log(f"INFO: removing backup '{mark['volid']}'")
                        removed += 1
            run.log(f"INFO: pruned {removed} backup(s) not covered by keep-retention policy")
    elapsed = int(time.time() - started)
    run.log(f"INFO: Finished Backup of VM {vmid} ({elapsed // 3600:02d}:{elapsed // 60 % 60:02d}:"
            f"{elapsed % 60:02d})")
    run.log(f"INFO: Backup finished at {datetime.now().strftime('%Y-%m-%d %H:%M:%S')}")
    return True


def _human_size(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor:
            return f"{round(size / factor)}{unit}"
    return f"{size}B"


def _write_archive(archive: Path, guest: dict[str, Any]) -> None:
    """A real tarball: the guest config and, for a rootfs directory, its files."""
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        conf = "".join(f"{k}: {v}\n" for k, v in sorted(guest["config"].items()) if k != "lock")
        data = conf.encode()
        info = tarfile.TarInfo("etc/vzdump/pct.conf" if guest["type"] == "lxc"
                               else "qemu-server.conf")
        info.size = len(data)
        info.mtime = int(time.time())
        tar.addfile(info, io.BytesIO(data))
        rootfs = guest.get("rootfs_dir")
        if rootfs and Path(rootfs).exists():
            tar.add(rootfs, arcname="rootfs")
    tmp.replace(archive)


# ============================================================================ backup jobs


def _job_out(sim: Simulator, job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    out.setdefault("type", "vzdump")
    out.setdefault("enabled", 1)
    if out.get("enabled") and out.get("schedule"):
        event = parse_calendar_event(out["schedule"])
        nxt = event.next_after(datetime.now().astimezone())
        if nxt is not None:
            out["next-run"] = int(nxt.timestamp())
    return out


_JOB_STRUCTURED = ("prune-backups", "fleecing", "performance")


def _job_store_value(key: str, value: Any) -> Any:
    return value


@route("GET", "/cluster/backup")
def backup_jobs(ctx: Ctx) -> Any:
    return [_job_out(ctx.sim, j) for _, j in sorted(ctx.sim.state["backup_jobs"].items())]


def _job_output_for_get(job: dict[str, Any]) -> dict[str, Any]:
    out = dict(job)
    for key in _JOB_STRUCTURED:
        if isinstance(out.get(key), str):
            values: dict[str, Any] = {}
            for part in out[key].split(","):
                k, sep, v = part.partition("=")
                if not sep:
                    k, v = "enabled", k
                values[k] = int(v) if v.isdigit() else v
            out[key] = values
    return out


@route("POST", "/cluster/backup")
def backup_job_create(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    jid = p.pop("id", None) or f"backup-{secrets.token_hex(4)}-{secrets.token_hex(2)}"
    if jid in sim.state["backup_jobs"]:
        raise _api_error(500, f"Job '{jid}' already exists")
    if not p.get("schedule"):
        p["schedule"] = p.pop("starttime", "00:00")
        if p.get("dow"):
            p["schedule"] = f"{p.pop('dow')} {p['schedule']}"
    if not p.get("vmid") and not p.get("all") and not p.get("pool"):
        raise _api_error(400, "Parameter verification failed.",
                         {"vmid": "no guests selected"})
    p.pop("starttime", None)
    p.pop("dow", None)
    p.setdefault("enabled", 1)
    if "storage" in p:
        scfg = _storage(sim, p["storage"])
        if not _has_content(scfg, "backup"):
            raise _api_error(500, f"storage '{p['storage']}' does not support backups")
    sim.state["backup_jobs"][jid] = {"id": jid, "type": "vzdump", **p}
    return None


def _job(ctx: Ctx) -> dict[str, Any]:
    job = ctx.sim.state["backup_jobs"].get(ctx.p["id"])
    if job is None:
        raise _api_error(500, f"job '{ctx.p['id']}' does not exist")
    return job


@route("GET", "/cluster/backup/{id}")
def backup_job_get(ctx: Ctx) -> Any:
    return _job_output_for_get(_job_out(ctx.sim, _job(ctx)))


@route("PUT", "/cluster/backup/{id}")
def backup_job_update(ctx: Ctx) -> Any:
    job = _job(ctx)
    p = dict(ctx.p)
    p.pop("id")
    deletes = [d for d in re.split(r"[,;\s]+", p.pop("delete", "")) if d]
    with ctx.sim.lock:
        for key in deletes:
            job.pop(key, None)
        if "starttime" in p or "dow" in p:
            p["schedule"] = f"{p.pop('dow', '')} {p.pop('starttime', '00:00')}".strip()
        job.update(p)
    return None


@route("DELETE", "/cluster/backup/{id}")
def backup_job_delete(ctx: Ctx) -> Any:
    _job(ctx)
    del ctx.sim.state["backup_jobs"][ctx.p["id"]]
    return None


@route("GET", "/cluster/backup/{id}/included_volumes")
def backup_job_volumes(ctx: Ctx) -> Any:
    job = _job(ctx)
    ids = _job_guests(ctx.sim, job)
    children = []
    for vmid in ids:
        guest = ctx.sim.state["guests"][str(vmid)]
        vols = [{"id": k, "name": v, "included": 1, "reason": "default"}
                for k, v in _disk_volids(guest["config"]).items() if not k.startswith("unused")]
        children.append({"id": vmid, "type": guest["type"], "name": _guest_name(guest),
                         "children": vols})
    return {"children": children}


def _job_guests(sim: Simulator, job: dict[str, Any]) -> list[int]:
    guests = sim.state["guests"]
    if int(job.get("all", 0)):
        ids = [int(v) for v in guests]
    elif job.get("pool"):
        ids = list(sim.state["pools"].get(job["pool"], {}).get("vms", []))
    else:
        ids = _vmid_list(job.get("vmid"))
    excluded = set(_vmid_list(job.get("exclude")))
    node = job.get("node")
    return sorted(v for v in ids if str(v) in guests and v not in excluded
                  and (node is None or guests[str(v)]["node"] == node))


@route("GET", "/cluster/backup-info/not-backed-up")
def not_backed_up(ctx: Ctx) -> Any:
    covered: set[int] = set()
    for job in ctx.sim.state["backup_jobs"].values():
        if int(job.get("enabled", 1)):
            covered.update(_job_guests(ctx.sim, job))
    out = []
    for guest in sorted(ctx.sim.state["guests"].values(), key=lambda g: g["vmid"]):
        if guest["vmid"] not in covered and not int(guest["config"].get("template", 0)):
            out.append({"vmid": guest["vmid"], "type": guest["type"],
                        "name": _guest_name(guest)})
    return out


# ============================================================================ /_sim


def sim_endpoint(sim: Simulator, method: str, rel: str, params: dict[str, Any]) -> Any:
    """The simulator's own API (not PVE): ``/_sim/faults``, ``/_sim/requests``."""
    if rel.rstrip("/") == "/_sim/faults":
        if method == "GET":
            return sim.faults.snapshot()
        if method == "POST":
            try:
                sim.faults.apply(params)
            except (KeyError, ValueError) as exc:
                raise _api_error(400, f"bad fault: {exc}") from exc
            return sim.faults.snapshot()
        if method == "DELETE":
            sim.faults.clear()
            return None
    if rel.rstrip("/") == "/_sim/requests" and method == "GET":
        return list(sim.requests)
    raise _api_error(501, f"Method '{method} {rel}' not implemented")


# ============================================================================ python helpers


def set_rootfs_dir(sim: Simulator, vmid: int, path: Path | str) -> None:
    guest = sim.state["guests"].get(str(vmid))
    if guest is None or guest["type"] != "lxc":
        raise KeyError(f"no container {vmid}")
    Path(path).mkdir(parents=True, exist_ok=True)
    with sim.lock:
        guest["rootfs_dir"] = str(path)


def add_guest(
    sim: Simulator,
    vmid: int,
    gtype: str = "lxc",
    node: str | None = None,
    config: dict[str, Any] | None = None,
    status: str = "stopped",
    disk_storage: str = "local-lvm",
    disk_size: int = 8 * GiB,
) -> dict[str, Any]:
    node = node or sim.state["nodes"][0]
    if str(vmid) in sim.state["guests"]:
        raise ValueError(f"guest {vmid} exists")
    cfg = dict(config or {})
    with sim.lock:
        volname = _next_disk_name(sim, node, disk_storage, vmid)
        volid = _alloc(sim, node, disk_storage, volname, disk_size, vmid,
                       "rootdir" if gtype == "lxc" else "images")
        if gtype == "lxc":
            cfg.setdefault("hostname", f"ct{vmid}")
            cfg.setdefault("rootfs", f"{volid},size={_size_text(disk_size)}")
            cfg.setdefault("arch", "amd64")
            cfg.setdefault("ostype", "debian")
            cfg.setdefault("memory", 512)
        else:
            cfg.setdefault("name", f"vm{vmid}")
            cfg.setdefault("scsi0", f"{volid},size={_size_text(disk_size)}")
            cfg.setdefault("memory", "2048")
        guest = new_guest(vmid, gtype, node, cfg)
        if status == "running":
            guest["status"] = "running"
            guest["started_at"] = time.time()
        sim.state["guests"][str(vmid)] = guest
    return guest


def add_backup(
    sim: Simulator,
    vmid: int,
    ctime: int,
    *,
    storage: str = "local",
    node: str | None = None,
    gtype: str = "lxc",
    protected: bool = False,
    notes: str = "",
    size: int = 1024**2,
) -> str:
    node = node or sim.state["nodes"][0]
    stamp = datetime.fromtimestamp(ctime).strftime("%Y_%m_%d-%H_%M_%S")
    ext = BACKUP_EXT[gtype]
    volid = f"{storage}:backup/vzdump-{gtype}-{vmid}-{stamp}.{ext}"
    with sim.lock:
        _volumes(sim, node, storage)[volid] = {
            "volid": volid, "content": "backup", "format": ext, "size": size, "ctime": ctime,
            "vmid": vmid, "subtype": gtype, "notes": notes, "protected": int(protected),
            "config": {},
        }
    return volid


def guest_state(sim: Simulator, vmid: int) -> dict[str, Any] | None:
    with sim.lock:
        guest = sim.state["guests"].get(str(vmid))
        return copy.deepcopy(guest) if guest else None
