"""``labkeeper init`` against the Proxmox simulator: the recorded multi-node cluster
and a cluster of 30 mixed guests. The written inventory validates, the first
``provision plan`` on it is empty, an imported Proxmox backup job runs with the
vzdump flow, and a guest with a config the model lacks is marked unmanaged.

The recorded fixture (``cluster-resources-multinode.gop.json``) has the cluster's
nodes, storages and guests but not the guests' configs: those are written here,
plausible for each guest (a running VM, a template, a stopped VM, one named "VM 200").
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.pvesim import Simulator
from tests.recorded import PVE

pytestmark = pytest.mark.integration

TOKEN_ID = "labkeeper@pve!init"
GiB = 1024**3
FAST = {"vzdump_poll_max": 0.1, "vzdump_lock_retry_delay": 0.2}  # settings.tuning


@dataclass
class Cluster:
    sim: Simulator
    secret: str
    secret_file: Path
    workdir: Path

    def init(self, *extra: str, output: str = "lab.yaml") -> tuple[Path, Any]:
        path = self.workdir / output
        result = CliRunner().invoke(app, [
            "init", "--proxmox", f"https://127.0.0.1:{self.sim.port}", "--token-id", TOKEN_ID,
            "--token-secret", f"file:{self.secret_file}", "--ca-file", self.sim.ca_file,
            "-o", str(path), *extra])
        return path, result

    def plan(self, inv: Inventory) -> pv.Plan:
        assert inv.proxmox is not None
        return pv.read_plan(px.connect(inv.proxmox), inv)


def _cluster(sim: Simulator, tmp_path: Path, secret: str) -> Iterator[Cluster]:
    secret_file = tmp_path / "pve-token"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    sim.start()
    try:
        yield Cluster(sim, secret, secret_file, tmp_path)
    finally:
        sim.stop()


# ------------------------------------------------------------------ the recorded cluster

RECORDED_CONFIGS: dict[int, dict[str, Any]] = {
    100: {"name": "server1", "cores": 2, "sockets": 1, "memory": "4096", "onboot": 1,
          "net0": "virtio=BC:24:11:10:00:64,bridge=vmbr0", "scsihw": "virtio-scsi-pci",
          "boot": "order=scsi0", "ostype": "l26", "agent": "1"},
    101: {"name": "leap154", "template": 1, "cores": 1, "memory": "2048",
          "net0": "virtio=BC:24:11:10:00:65,bridge=vmbr0", "ostype": "l26"},
    102: {"name": "machine-test", "cores": 1, "memory": "1024", "ciuser": "test",
          "ipconfig0": "ip=dhcp", "net0": "virtio=BC:24:11:10:00:66,bridge=vmbr0",
          "ide2": "local-zfs:vm-102-cloudinit,media=cdrom"},
    200: {"name": "VM 200", "cores": 1, "memory": "512"},
}


@pytest.fixture
def recorded(tmp_path: Path) -> Iterator[Cluster]:
    resources = json.loads((PVE / "cluster-resources-multinode.gop.json").read_text())["data"]
    nodes = sorted(r["node"] for r in resources if r["type"] == "node")
    secret = str(uuid.uuid4())
    sim = Simulator(nodes=nodes, task_duration=0.01, tokens={TOKEN_ID: secret}, seed=False)
    storages = {r["storage"]: r for r in resources if r["type"] == "storage"}
    sim.state["storages"] = {sid: {"type": r["plugintype"], "content": r["content"],
                                   "shared": 0, "total": 500 * GiB}
                             for sid, r in storages.items()}
    sim.state["volumes"] = {n: {sid: {} for sid in storages} for n in nodes}
    for r in resources:
        if r["type"] != "qemu":
            continue
        config = dict(RECORDED_CONFIGS[r["vmid"]])
        if r.get("tags"):
            config["tags"] = r["tags"]
        sim.add_guest(r["vmid"], "qemu", node=r["node"], config=config, status=r["status"],
                      disk_storage="local-zfs", disk_size=32 * GiB)
    for job in json.loads((PVE / "cluster-backup-jobs.cpx.json").read_text()):
        sim.state["backup_jobs"][job["id"]] = {k: v for k, v in job.items() if k != "next-run"}
    yield from _cluster(sim, tmp_path, secret)


def _guest_comment(text: str, vmid: int) -> str:
    """The comment lines written above guest ``vmid``."""
    block = text.split("\nguests:\n", 1)[1]
    lines: list[str] = []
    item: list[str] = []
    for line in block.splitlines():
        if line.startswith("  #"):
            lines.append(line)
        elif line.startswith("  - "):
            item, lines = lines, []
        elif line == f"    vmid: {vmid}":
            return "\n".join(item)
    raise AssertionError(f"guest {vmid} not in the inventory")


def test_init_of_the_recorded_cluster_validates_and_its_first_plan_is_empty(recorded: Cluster):
    path, result = recorded.init()
    assert result.exit_code == 0, result.output
    inv = load_inventory(path)
    text = path.read_text()
    assert recorded.secret not in text and f"file:{recorded.secret_file}" in text
    plan = recorded.plan(inv)
    assert plan.is_empty, plan.table()
    assert {g.vmid for g in inv.guests} == {100, 101, 102, 200}
    assert not any(g.managed for g in inv.guests)  # none carries the labkeeper tag yet
    assert "a template" in _guest_comment(text, 101)
    assert "stopped" in _guest_comment(text, 102)
    assert "'VM 200' is not a hostname label" in _guest_comment(text, 200)
    assert "described exactly" in _guest_comment(text, 100)
    assert inv.guest(102).tags == ["go-proxmox+cloud-init"]
    storages = {s.name: s for s in inv.proxmox.storages}
    assert storages["local-zfs"].type == "zfspool"
    assert set(storages["local"].content) == {"backup", "vztmpl", "iso"}
    jobs = {j.name: j for j in inv.vzdump_jobs}
    assert jobs["backup-83831498-c631"].schedule == "30 6,18 * * *"
    assert jobs["backup-70025700-2302"].schedule == "0 15 * * 6"
    assert jobs["backup-70025700-2302"].selection.vmids == [100, 101, 102]
    assert not any(j.enabled for j in jobs.values())  # Proxmox runs them until told not to


def test_init_never_overwrites_without_force_and_dry_run_writes_nothing(recorded: Cluster):
    path = recorded.workdir / "lab.yaml"
    path.write_text("mine\n")
    _, refused = recorded.init()
    assert refused.exit_code == 2 and "exists" in refused.output
    assert path.read_text() == "mine\n"
    _, dry = recorded.init("--dry-run", output="other.yaml")
    assert dry.exit_code == 0 and "vzdump_jobs:" in dry.output
    assert not (recorded.workdir / "other.yaml").exists()
    _, forced = recorded.init("--force")
    assert forced.exit_code == 0, forced.output
    assert path.read_text().startswith("# labkeeper inventory")


def test_an_imported_proxmox_job_runs_with_the_vzdump_flow(recorded: Cluster, prefect_harness):
    from flows.vzdump import vzdump_flow

    path, result = recorded.init()
    assert result.exit_code == 0, result.output
    fast = yaml.safe_load(path.read_text())
    fast["settings"] = {**(fast.get("settings") or {}), "tuning": FAST}
    path.write_text(yaml.safe_dump(fast, sort_keys=False))
    state = vzdump_flow(job="backup-83831498-c631", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [(r["vmid"], r["status"]) for r in rows] == [(100, "ok")]
    assert rows[0]["archive"].startswith("local:backup/vzdump-qemu-100-")


# ------------------------------------------------------------------ 30 mixed guests

PASSTHROUGH = 111
MOUNTPOINT = 120
TEMPLATE = 129
STOPPED = (105, 117)
SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
           "admin@lab")


def _mixed_config(vmid: int) -> tuple[str, dict[str, Any]]:
    i = vmid - 100
    net = f"10.0.{i % 3}.{i + 10}"
    tags = ["app"] + (["labkeeper"] if i % 4 == 0 else [])
    if i % 2 == 0:
        cfg: dict[str, Any] = {
            "hostname": f"ct{vmid}", "cores": 1 + i % 3, "memory": 512 * (1 + i % 2),
            "swap": 256, "unprivileged": 1, "ostype": "debian", "onboot": 1,
            "net0": f"name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:01:{i:02X},"
                    f"ip={net}/24,gw=10.0.{i % 3}.1,type=veth",
            "tags": ";".join(tags), "arch": "amd64", "console": 1, "tty": 2}
        if i % 6 == 0:
            cfg["features"] = "nesting=1,keyctl=1"
        return "lxc", cfg
    cfg = {"name": f"vm{vmid}", "cores": 2, "sockets": 1, "memory": "2048", "onboot": 1,
           "net0": f"virtio=BC:24:11:00:02:{i:02X},bridge=vmbr0", "scsihw": "virtio-scsi-pci",
           "boot": "order=scsi0", "agent": "1", "tags": ";".join(tags)}
    if i % 3 == 1:
        cfg.update({"ciuser": "admin", "sshkeys": SSH_KEY.replace(" ", "%20"),
                    "ipconfig0": f"ip={net}/24,gw=10.0.{i % 3}.1",
                    "ide2": f"local-lvm:vm-{vmid}-cloudinit,media=cdrom"})
    return "qemu", cfg


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[Cluster]:
    secret = str(uuid.uuid4())
    sim = Simulator(nodes=("pve1", "pve2", "pve3"), task_duration=0.01,
                    tokens={TOKEN_ID: secret})
    for vmid in range(100, 130):
        gtype, config = _mixed_config(vmid)
        if vmid == PASSTHROUGH:
            config["hostpci0"] = "0000:01:00.0,pcie=1,x-vga=1"
        if vmid == MOUNTPOINT:
            config["mp0"] = "local-lvm:vm-120-disk-1,mp=/srv/data,size=50G"
        if vmid == 104:
            config.update({"startup": "order=2", "protection": 1,
                           "description": "reverse proxy\nfor every app"})
        if vmid == TEMPLATE:
            gtype, config = "qemu", {"name": "golden", "template": 1, "memory": "1024"}
        status = "stopped" if vmid in STOPPED or vmid == TEMPLATE else "running"
        sim.add_guest(vmid, gtype, node=f"pve{vmid % 3 + 1}", config=config, status=status,
                      disk_size=(4 + vmid % 5) * GiB)
    sim.state["backup_jobs"]["backup-nightly"] = {
        "id": "backup-nightly", "type": "vzdump", "vmid": "100,101,103,108", "storage": "local",
        "schedule": "mon..fri 02:30", "mode": "snapshot", "compress": "zstd", "enabled": 1,
        "prune-backups": "keep-last=2,keep-weekly=4", "notes-template": "{{guestname}}",
        "mailnotification": "failure"}
    yield from _cluster(sim, tmp_path, secret)


def test_thirty_guests_are_described_and_the_first_plan_is_empty(mixed: Cluster):
    path, result = mixed.init()
    assert result.exit_code == 0, result.output
    inv = load_inventory(path)
    text = path.read_text()
    assert len(inv.guests) == 30 + 1  # and the simulator's cloud-init template 9000
    plan = mixed.plan(inv)
    assert plan.is_empty, plan.table()
    tagged = {v for v in range(100, 130, 4)} - {*STOPPED, MOUNTPOINT, TEMPLATE}
    assert {g.vmid for g in inv.guests if g.managed} == tagged
    assert {g.vmid for g in plan.guests if g.action == "leave"} == tagged
    proxy = inv.guest(104)
    assert (proxy.startup_order, proxy.protection, proxy.description) == (
        2, True, "reverse proxy\nfor every app")
    job = inv.vzdump_job("backup-nightly")
    assert (job.schedule, job.compress, job.retention.keep_last, job.retention.keep_weekly) == (
        "30 2 * * 1-5", "zstd", 2, 4)
    assert "mailnotification=failure" in text


def test_a_guest_with_a_passthrough_device_is_unmanaged_not_misdescribed(mixed: Cluster):
    path, result = mixed.init()
    assert result.exit_code == 0, result.output
    inv = load_inventory(path)
    text = path.read_text()
    gpu = inv.guest(PASSTHROUGH)
    assert not gpu.managed
    comment = _guest_comment(text, PASSTHROUGH)
    assert "UNMANAGED" in comment and "hostpci0=0000:01:00.0" in comment
    actual = mixed.sim.guest(PASSTHROUGH)["config"]
    assert gpu.resources.cores == actual["cores"] and gpu.resources.memory_mb == 2048
    assert gpu.network[0].mac == "BC:24:11:00:02:0B"
    mount = _guest_comment(text, MOUNTPOINT)
    assert "UNMANAGED" in mount and "mp0=" in mount
    assert "stopped" in _guest_comment(text, STOPPED[0])
    assert "a template" in _guest_comment(text, TEMPLATE)


def test_adopting_every_exactly_described_guest_keeps_the_plan_empty(mixed: Cluster):
    """Run each ``TODO adopt`` command (through the API) and delete ``managed: false``:
    the plan still changes nothing, so the description was exact."""
    path, result = mixed.init()
    assert result.exit_code == 0, result.output
    text = path.read_text()
    adopt = {int(m.group(1)): m.group(2) for m in re.finditer(
        r"TODO adopt: .*? set (\d+) --tags '([^']*)'", text)}
    assert len(adopt) >= 10
    inv = load_inventory(path)
    api = px.connect(inv.proxmox)
    for vmid, tags in adopt.items():
        g = inv.guest(vmid)
        px.configure(api, g.node, vmid, g.type, {"tags": tags})
    doc = yaml.safe_load(text)
    for g in doc["guests"]:
        if g["vmid"] in adopt:
            del g["managed"]
    adopted = mixed.workdir / "adopted.yaml"
    adopted.write_text(yaml.safe_dump(doc, sort_keys=False))
    inv2 = load_inventory(adopted)
    plan = mixed.plan(inv2)
    assert plan.is_empty, plan.table()
    assert set(adopt) <= {g.vmid for g in plan.guests if g.action == "leave"}


def test_init_lists_the_database_servers_databases(lab, tmp_path: Path):
    pg = lab.postgres
    path = tmp_path / "db.yaml"
    result = CliRunner().invoke(app, [
        "init", "--postgres", f"{pg.host}:{pg.port}", "--pg-user", pg.app_user,
        "--pg-password", f"file:{pg.password_file}", "-o", str(path)])
    assert result.exit_code == 0, result.output
    inv = load_inventory(path)
    assert set(pg.database_names) <= {d.effective_dbname for d in inv.databases}
    assert {d.repository for d in inv.databases} == {"main"}
    assert pg.password_file.read_text().strip() not in path.read_text()
