"""Shared set-up for the vzdump/offsite integration tests (imported by their modules).

A simulator of our own (host paths on, so the lab's sshd can read archives at the
path PVE reports), the session lab's sshd standing in for every node and its
S3 bucket as the off-site target; inventories are modified copies of the lab's.
"""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path
from typing import Any

import yaml

from labkeeper.locallab.lab import write_secret
from labkeeper.pvesim import Simulator
from labkeeper.pvesim.api import add_guest

TOKEN_ID = "labkeeper@pve!vz"
NODES = ("pve1", "pve2", "pve3")
_vmids = itertools.count(3000)


def next_vmid() -> int:
    return next(_vmids)


class VzEnv:
    def __init__(self, lab: Any, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        secret = secrets.token_hex(16)
        self.secret_path = write_secret(workdir / "secrets" / "pve-token", secret)
        self.sim = Simulator(nodes=NODES, task_duration=0.05, tokens={TOKEN_ID: secret},
                             host_paths=True, data_dir=workdir / "pvesim")
        self.sim.start(host="127.0.0.1", port=0)
        self._n = itertools.count()

    def stop(self) -> None:
        self.sim.stop()

    def guests(self, tag: str, placement: dict[str, int], gtype: str = "lxc",
               **config: Any) -> list[int]:
        """Add guests tagged ``tag``: ``{"pve1": 2, "pve2": 1}``; returns their vmids."""
        out = []
        for node, count in placement.items():
            for _ in range(count):
                vmid = next_vmid()
                add_guest(self.sim, vmid, gtype, node, config={"tags": tag, **config},
                          status="running")
                out.append(vmid)
        return out

    def inventory(self, jobs: list[dict[str, Any]], *, s3: Any = None,
                  tuning: dict[str, Any] | None = None) -> Path:
        """A copy of the lab inventory pointing at our simulator, with ``jobs``; quick
        polls and lock retries (``settings.tuning``, over ``tuning``)."""
        inv = yaml.safe_load(self.lab.inventory_path.read_text())
        sshd = self.lab.sshd
        inv["proxmox"] = {
            "host": self.sim.host, "port": self.sim.port, "token_id": TOKEN_ID,
            "token_secret": f"file:{self.secret_path}",
            "tls": {"ca_file": str(self.sim.ca_file)},
            "nodes": [{"name": n, "address": sshd.host, "ssh_user": sshd.user} for n in NODES],
            "storages": [
                {"name": "local", "type": "dir",
                 "content": ["iso", "vztmpl", "backup", "snippets"], "snapshots": False},
                {"name": "local-lvm", "type": "lvmthin", "content": ["images", "rootdir"],
                 "snapshots": True},
            ],
        }
        inv["ssh"]["port"] = sshd.port
        inv["settings"]["state_dir"] = str(self.workdir / "state")
        inv["settings"]["tuning"] = {**FAST_TUNING, **(tuning or {})}
        if s3 is not None:
            sec = self.workdir / "secrets"
            write_secret(sec / "own-s3-key-id", s3.access_key_id)
            write_secret(sec / "own-s3-secret", s3.secret_access_key)
            repo = inv["repositories"][0]
            repo["url"] = f"s3:{s3.endpoint}/{s3.bucket}/restic"
            repo["s3"] = {"endpoint": s3.endpoint, "bucket": s3.bucket, "region": s3.region,
                          "access_key_id": f"file:{sec / 'own-s3-key-id'}",
                          "secret_access_key": f"file:{sec / 'own-s3-secret'}"}
        inv["vzdump_jobs"] = jobs
        path = self.workdir / f"lab-{next(self._n)}.yaml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path


FAST_TUNING = {"vzdump_poll_max": 0.1, "vzdump_lock_retry_delay": 0.2}
"""settings.tuning of the test inventories: polls and lock retries that suit the simulator."""


def job(name: str, tag: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "selection": {"tags": [tag]}, "storage": "local",
                           "retention": {"keep_last": 2}, "schedule": "30 1 * * *"}
    out.update(kw)
    return out


def vzdump_tasks(sim: Simulator, vmids: list[int]) -> list[dict[str, Any]]:
    wanted = {str(v) for v in vmids}
    with sim.lock:
        return [dict(t) for t in sim.state["tasks"] if t["type"] == "vzdump" and t["id"] in wanted]


def archives(sim: Simulator, vmid: int) -> list[dict[str, Any]]:
    with sim.lock:
        out = []
        for storages in sim.state["volumes"].values():
            for vols in storages.values():
                out += [dict(v) for v in vols.values()
                        if v["content"] == "backup" and v.get("vmid") == vmid]
        return out
