"""``POST /nodes/{node}/vzdump``: backups as real tarballs, with PVE's task log and pruning."""

from __future__ import annotations

import io
import re
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim import prune
from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.perms import require
from labkeeper.pvesim.routes.common import check_node, guest_label, guest_name, vmid_list
from labkeeper.pvesim.routes.registry import Ctx, route
from labkeeper.pvesim.routes.volumes import (
    archive_file,
    disk_volids,
    has_content,
    snapshot_capable,
    storage_config,
    storage_volumes,
    volume_path,
)
from labkeeper.pvesim.state import BACKUP_EXT
from labkeeper.pvesim.tasks import TaskFailed, TaskRun

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator

Fail = Callable[[str], bool]


@route("POST", "/nodes/{node}/vzdump")
def vzdump(ctx: Ctx) -> Any:
    sim, p = ctx.sim, dict(ctx.p)
    node = p["node"]
    check_node(sim, node)
    who = ctx.principal
    for option in ("stdout", "dumpdir"):
        if p.get(option):
            raise ApiError(501, f"vzdump --{option} is not implemented by the labkeeper "
                                "Proxmox VE simulator")
    storage = p.get("storage", "local")
    scfg = storage_config(sim, storage)
    if not has_content(scfg, "backup"):
        raise ApiError(500, f"storage '{storage}' does not support backups")
    require(who, f"/storage/{storage}", "Datastore.AllocateSpace")
    selected = _select_guests(sim, p)
    for vmid in selected:
        if str(vmid) not in sim.state["guests"] and not p.get("all"):
            raise ApiError(500, f"unable to find VM {vmid}")
        require(who, f"/vms/{vmid}", "VM.Backup")
    local, external = _split_by_node(sim, p, selected, node)
    retention_text = p.get("prune-backups") or scfg.get("prune-backups")
    job = _Job(sim, node, storage, p.get("mode", "snapshot"), p.get("compress", "0"), p,
               retention_text if int(p.get("remove", 1)) else None, local, external,
               _cmdline(dict(ctx.p.items())))
    tid = str(selected[0]) if len(selected) == 1 and not p.get("all") else ""
    return sim.tasks.start(node, "vzdump", tid, ctx.user, job.run,
                           vmid=selected[0] if len(selected) == 1 else None)


def _select_guests(sim: Simulator, p: dict[str, Any]) -> list[int]:
    """The VMIDs to back up: ``all``, a ``pool`` or a ``vmid`` list, minus ``exclude``."""
    if not p.get("vmid") and not p.get("all") and not p.get("pool"):
        raise ApiError(500, "No guest selected for backup. Set 'vmid', 'pool' or 'all'.")
    if p.get("all"):
        selected = sorted(int(v) for v in sim.state["guests"])
    elif p.get("pool"):
        pool = sim.state["pools"].get(p["pool"])
        if pool is None:
            raise ApiError(500, f"pool '{p['pool']}' does not exist")
        selected = sorted(pool.get("vms", []))
    else:
        selected = vmid_list(p.get("vmid"))
    excluded = set(vmid_list(p.get("exclude")))
    return [v for v in selected if v not in excluded]


def _split_by_node(
    sim: Simulator, p: dict[str, Any], selected: list[int], node: str
) -> tuple[list[int], list[int]]:
    """(guests on this node, guests elsewhere that the log names as skipped)."""
    guests = sim.state["guests"]
    local = [v for v in selected if guests[str(v)]["node"] == node]
    external = [v for v in selected if guests[str(v)]["node"] != node]
    if p.get("all") and p.get("vmid") is None:
        external = []
    return local, external


def _vzdump_lock(sim: Simulator, node: str) -> threading.Lock:
    with sim.lock:
        return sim._vzdump_locks.setdefault(node, threading.Lock())


def _render_notes(template: str, guest: dict[str, Any], sim: Simulator) -> str:
    values = {"guestname": guest_name(guest), "vmid": str(guest["vmid"]),
              "node": guest["node"], "cluster": sim.cluster_name}
    out = template
    for key, value in values.items():
        out = out.replace("{{" + key + "}}", value)
    return out.replace("\\n", "\n")


def _cmdline(p: dict[str, Any]) -> str:
    parts = ["vzdump"]
    if p.get("vmid"):
        parts.append(" ".join(str(v) for v in vmid_list(p["vmid"])))
    for key, value in p.items():
        if key in ("vmid", "node"):
            continue
        text = str(value)
        if re.search(r"[\s'{}]", text):
            text = "'" + text.replace("'", "'\\''") + "'"
        parts.append(f"--{key} {text}")
    parts.append(f"--node {p['node']}")
    return " ".join(parts)


def _archive_ext(gtype: str, compress: str) -> str:
    """``tar.zst`` / ``vma.zst`` as PVE names them, with the compressor's suffix."""
    ext = BACKUP_EXT[gtype]
    if compress in ("0", ""):
        ext = ext.rsplit(".", 1)[0]
    elif compress in ("gzip", "1"):
        ext = ext.rsplit(".", 1)[0] + ".gz"
    elif compress == "lzo":
        ext = ext.rsplit(".", 1)[0] + ".lzo"
    return ext


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S")


@dataclass
class _Job:
    """One vzdump task: take the node's vzdump lock, back each local guest up in turn."""

    sim: Simulator
    node: str
    storage: str
    mode: str
    compress: str
    p: dict[str, Any]
    retention_text: str | None
    local: list[int]
    external: list[int]
    cmdline: str

    def run(self, run: TaskRun) -> None:
        lock = self._acquire(run)
        try:
            run.log(f"INFO: starting new backup job: {self.cmdline}")
            if self.external:
                run.log(f"INFO: skip external VMs: {', '.join(map(str, self.external))}")
            errors = 0
            for vmid in self.local:
                if not self._backup_one(run, vmid):
                    errors += 1
            if errors:
                run.log("INFO: Backup job finished with errors")
                raise TaskFailed("job errors")
            run.log("INFO: Backup job finished successfully")
        finally:
            lock.release()

    def _acquire(self, run: TaskRun) -> threading.Lock:
        lock = _vzdump_lock(self.sim, self.node)
        if lock.acquire(blocking=False):
            return lock
        run.log("INFO: trying to get global lock - waiting...")
        deadline = time.monotonic() + int(self.p.get("lockwait", 180)) * 60
        while not lock.acquire(timeout=0.05):
            if run.stop_event.is_set():
                raise TaskFailed("interrupted by signal")
            if time.monotonic() > deadline:
                raise TaskFailed("can't acquire lock '/var/run/vzdump.lock' - got timeout")
        run.log("INFO: got global lock")
        return lock

    def _backup_one(self, run: TaskRun, vmid: int) -> bool:
        sim = self.sim
        guest = sim.state["guests"].get(str(vmid))
        gtype = guest["type"] if guest else "qemu"
        run.log(f"INFO: Starting Backup of VM {vmid} ({gtype})")
        started = time.time()
        stamp = datetime.fromtimestamp(started)
        run.log(f"INFO: Backup started at {stamp.strftime('%Y-%m-%d %H:%M:%S')}")

        def fail(message: str) -> bool:
            run.log(f"ERROR: Backup of VM {vmid} failed - {message}")
            run.log(f"INFO: Failed at {_now()}")
            return False

        if guest is None:
            return fail(f"unable to find configuration file for VM {vmid} on node '{self.node}'")
        with sim.lock:
            lock = guest["config"].get("lock")
            if lock:
                return fail(f"{guest_label(gtype)} is locked ({lock})")
            guest["config"]["lock"] = "backup"
        try:
            return _Backup(self, run, guest, started, fail).run()
        finally:
            with sim.lock:
                if guest["config"].get("lock") == "backup":
                    guest["config"].pop("lock", None)


@dataclass
class _Backup:
    """One guest's backup inside a job, logged line by line as PVE's vzdump logs it."""

    job: _Job
    run_: TaskRun
    guest: dict[str, Any]
    started: float
    fail: Fail

    def run(self) -> bool:
        job, run, guest = self.job, self.run_, self.guest
        running = guest["status"] == "running"
        self._log_guest()
        mode = self._mode(running)
        lxc_snapshot = mode == "snapshot" and guest["type"] == "lxc"
        ext = _archive_ext(guest["type"], job.compress)
        volid, ts = self._new_volid(ext)
        path = volume_path(job.sim, volid, job.node)
        run.log(f"INFO: creating vzdump archive '{path}'")
        run.sleep()
        if job.sim.faults.is_full(job.storage, job.node):
            return self._fail_full(lxc_snapshot, path, ext)
        message = run.injected_failure()
        if message is not None:
            if lxc_snapshot:
                run.log("INFO: cleanup temporary 'vzdump' snapshot")
            return self.fail(message)
        self._store(volid, ts, ext)
        if lxc_snapshot:
            run.log("INFO: cleanup temporary 'vzdump' snapshot")
        if mode == "stop" and running:
            run.log("INFO: restarting vm")
            run.log("INFO: guest is online again after <1 seconds")
        if job.retention_text:
            self._prune(job.retention_text)
        elapsed = int(time.time() - self.started)
        run.log(f"INFO: Finished Backup of VM {guest['vmid']} ({elapsed // 3600:02d}:"
                f"{elapsed // 60 % 60:02d}:{elapsed % 60:02d})")
        run.log(f"INFO: Backup finished at {_now()}")
        return True

    def _log_guest(self) -> None:
        run, guest = self.run_, self.guest
        run.log(f"INFO: status = {guest['status']}")
        if guest["type"] == "lxc":
            run.log(f"INFO: CT Name: {guest_name(guest)}")
            run.log("INFO: including mount point rootfs ('/') in backup")
            return
        run.log(f"INFO: VM Name: {guest_name(guest)}")
        for key, volid in disk_volids(guest["config"]).items():
            if "cloudinit" in volid or key.startswith("unused"):
                continue
            match = re.search(r"size=(\S+?)(?:,|$)", str(guest["config"][key]))
            run.log(f"INFO: include disk '{key}' '{volid}' {match.group(1) if match else ''}")

    def _mode(self, running: bool) -> str:
        """The backup mode used: a container without snapshot storage falls back to suspend."""
        job, run, guest = self.job, self.run_, self.guest
        gtype, mode = guest["type"], job.mode
        if mode == "snapshot" and gtype == "lxc" and not snapshot_capable(job.sim,
                                                                          guest["config"]):
            run.log("INFO: mode failure - some volumes do not support snapshots")
            run.log("INFO: trying 'suspend' mode instead")
            mode = "suspend"
        run.log(f"INFO: backup mode: {mode}")
        run.log(f"INFO: ionice priority: {job.p.get('ionice', 7)}")
        if mode == "stop" and running:
            run.log("INFO: stopping virtual guest")
        if mode == "snapshot" and gtype == "lxc":
            run.log("INFO: create storage snapshot 'vzdump'")
        return mode

    def _new_volid(self, ext: str) -> tuple[str, int]:
        """A free archive name (the timestamp moves on a second while it is taken)."""
        job, guest = self.job, self.guest
        with job.sim.lock:
            ts = int(self.started)
            while True:
                stamp = datetime.fromtimestamp(ts).strftime("%Y_%m_%d-%H_%M_%S")
                filename = f"vzdump-{guest['type']}-{guest['vmid']}-{stamp}.{ext}"
                volid = f"{job.storage}:backup/{filename}"
                if volid not in storage_volumes(job.sim, job.node, job.storage):
                    return volid, ts
                ts += 1

    def _fail_full(self, lxc_snapshot: bool, path: str, ext: str) -> bool:
        run = self.run_
        run.log("INFO: zstd: error 70 : Write error : cannot write block : No space left on "
                "device")
        if self.guest["type"] != "lxc":
            return self.fail("vma_queue_write: write error - Broken pipe")
        if lxc_snapshot:
            run.log("INFO: cleanup temporary 'vzdump' snapshot")
        return self.fail(f"command 'set -o pipefail && tar cpf - --totals --one-file-system -p "
                         f"--sparse --numeric-owner --acls --xattrs ./ | zstd --rsyncable "
                         f"'--threads=1' >{path[:-len(ext)]}dat' failed: exit code 70")

    def _store(self, volid: str, ts: int, ext: str) -> None:
        """Write the archive and add its volume (notes, protection) to the storage."""
        job, run, guest = self.job, self.run_, self.guest
        archive = archive_file(job.sim, job.node, volid)
        archive.parent.mkdir(parents=True, exist_ok=True)
        _write_archive(archive, guest)
        size = archive.stat().st_size
        if guest["type"] == "lxc":
            written = max(size, 10240)
            run.log(f"INFO: Total bytes written: {written} ({max(written // 1024**2, 1)}MiB, "
                    f"{max(written // 1024**2, 1)}MiB/s)")
        else:
            run.log(f"INFO: transferred {size / 1024:.2f} KiB in <1 seconds")
        run.log(f"INFO: archive file size: {_human_size(size)}")
        p = job.p
        notes = _render_notes(p["notes-template"], guest, job.sim) if p.get("notes-template") \
            else ""
        entry = {
            "volid": volid, "content": "backup", "format": ext, "size": size, "ctime": ts,
            "vmid": guest["vmid"], "subtype": guest["type"], "notes": notes,
            "protected": int(p.get("protected", 0)),
            "config": {k: v for k, v in guest["config"].items() if k != "lock"},
        }
        if notes:
            run.log("INFO: adding notes to backup")
        if entry["protected"]:
            run.log("INFO: marking backup as protected")
        with job.sim.lock:
            storage_volumes(job.sim, job.node, job.storage)[volid] = entry

    def _prune(self, retention_text: str) -> None:
        job, run, guest = self.job, self.run_, self.guest
        keep = prune.parse_retention(retention_text)
        if keep.get("keep-all"):
            return
        run.log(f"INFO: prune older backups with retention: {retention_text}")
        with job.sim.lock:
            volumes = storage_volumes(job.sim, job.node, job.storage)
            group = [e for e in volumes.values()
                     if e["content"] == "backup" and e.get("vmid") == guest["vmid"]
                     and e.get("subtype") == guest["type"]]
            removed = 0
            for mark in prune.prune_marks(group, keep):
                if mark["mark"] == "remove":
                    volumes.pop(mark["volid"], None)
                    archive_file(job.sim, job.node, mark["volid"]).unlink(missing_ok=True)
                    run.log(f"INFO: removing backup '{mark['volid']}'")
                    removed += 1
        run.log(f"INFO: pruned {removed} backup(s) not covered by keep-retention policy")


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
