"""The simulated cluster's state: plain JSON-able dicts, seeded small, persisted as JSON."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

GiB = 1024**3
MiB = 1024**2

DEFAULT_TEMPLATES = (
    ("debian-12-standard_12.7-1_amd64.tar.zst", 126 * MiB),
    ("ubuntu-24.04-standard_24.04-2_amd64.tar.zst", 141 * MiB),
)

DEFAULT_STORAGES: dict[str, dict[str, Any]] = {
    "local": {
        "type": "dir",
        "content": "backup,iso,snippets,vztmpl",
        "path": "/var/lib/vz",
        "snapshots": 0,
        "shared": 0,
        "total": 100 * GiB,
    },
    "local-lvm": {
        "type": "lvmthin",
        "content": "images,rootdir",
        "snapshots": 1,
        "shared": 0,
        "total": 400 * GiB,
    },
}

BACKUP_EXT = {"lxc": "tar.zst", "qemu": "vma.zst"}
TEMPLATE_VMID = 9000


def empty_state(nodes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "version": 1,
        "nodes": list(nodes),
        "storages": json.loads(json.dumps(DEFAULT_STORAGES)),
        "volumes": {node: {sid: {} for sid in DEFAULT_STORAGES} for node in nodes},
        "guests": {},
        "tasks": [],
        "backup_jobs": {},
        "pools": {},
        "started": int(time.time()),
        "next_pid": 0x1A2B0,
    }


def seed_state(nodes: tuple[str, ...]) -> dict[str, Any]:
    """The default lab: templates on every node, a QEMU cloud-init template on the first."""
    state = empty_state(nodes)
    now = int(time.time())
    for node in nodes:
        for name, size in DEFAULT_TEMPLATES:
            volid = f"local:vztmpl/{name}"
            state["volumes"][node]["local"][volid] = {
                "volid": volid,
                "content": "vztmpl",
                "format": "tzst",
                "size": size,
                "ctime": now - 86400 * 30,
            }
    first = nodes[0]
    vmid = TEMPLATE_VMID
    state["guests"][str(vmid)] = new_guest(
        vmid,
        "qemu",
        first,
        {
            "name": "debian12-cloudinit",
            "template": 1,
            "memory": "2048",
            "cores": 2,
            "sockets": 1,
            "ostype": "l26",
            "scsihw": "virtio-scsi-pci",
            "scsi0": f"local-lvm:base-{vmid}-disk-0,size=3G",
            "ide2": f"local-lvm:vm-{vmid}-cloudinit,media=cdrom",
            "boot": "order=scsi0",
            "net0": "virtio=BC:24:11:9A:00:01,bridge=vmbr0",
            "ipconfig0": "ip=dhcp",
            "ciuser": "debian",
            "agent": "1",
            "serial0": "socket",
            "vga": "serial0",
        },
    )
    vols = state["volumes"][first]["local-lvm"]
    for volname, size in ((f"base-{vmid}-disk-0", 3 * GiB), (f"vm-{vmid}-cloudinit", 4 * MiB)):
        volid = f"local-lvm:{volname}"
        vols[volid] = {
            "volid": volid,
            "content": "images",
            "format": "raw",
            "size": size,
            "vmid": vmid,
            "ctime": now - 86400 * 30,
        }
    return state


def new_guest(vmid: int, gtype: str, node: str, config: dict[str, Any]) -> dict[str, Any]:
    return {
        "vmid": vmid,
        "type": gtype,
        "node": node,
        "status": "stopped",
        "started_at": None,
        "config": dict(config),
        "snapshots": {},
        "pool": None,
        "rootfs_dir": None,
    }


def load_state(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text(encoding="utf-8"))
    for task in state.get("tasks", []):
        if task.get("status") == "running":
            task["status"] = "stopped"
            task["exitstatus"] = "unexpected status"
            task.setdefault("log", []).append("TASK ERROR: simulator restarted")
            task["endtime"] = int(time.time())
    for guest in state.get("guests", {}).values():
        lock = guest["config"].get("lock")
        if lock in ("backup", "create", "clone", "destroyed"):
            guest["config"].pop("lock", None)
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)
