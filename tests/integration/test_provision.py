"""Provisioning against the Proxmox simulator, with the local sshd standing in for
every guest's SSH (the inventory's guests point their ``ssh`` at it).

Each test gets a fresh simulator (fast tasks), so "an empty cluster" is empty.
The core steps run directly here; tests/integration/test_provision_flow.py runs
the Prefect flow.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.jobs import plan_cli
from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.errors import ServiceError
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.locallab.ports import free_port
from labkeeper.locallab.sshd import LocalSshd
from labkeeper.pvesim import Simulator

pytestmark = pytest.mark.integration

TOKEN_ID = "labkeeper@pve!prov"
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


@dataclass
class Pve:
    sim: Simulator
    secret_file: Path
    workdir: Path
    sshd: LocalSshd

    def write(self, guests: list[dict[str, Any]], *, roles: dict[str, Any] | None = None,
              provision: dict[str, Any] | None = None, name: str = "lab.yaml") -> Path:
        inv: dict[str, Any] = {
            "version": 1, "lab": {"name": "prov-test"},
            "settings": {"state_dir": str(self.workdir / "state"),
                         "provision": {"ssh_wait_timeout": 5, **(provision or {})}},
            "proxmox": {
                "host": "127.0.0.1", "port": self.sim.port, "token_id": TOKEN_ID,
                "token_secret": f"file:{self.secret_file}", "tls": {"ca_file": self.sim.ca_file},
                "timeout": 10, "task_timeout": 20,
                "nodes": [{"name": "pve1"}, {"name": "pve2"}],
                "storages": [
                    {"name": "local", "type": "dir", "content": ["vztmpl", "backup", "iso"]},
                    {"name": "local-lvm", "type": "lvmthin", "content": ["images", "rootdir"]},
                ],
            },
            "ssh": {"user": self.sshd.user, "key": self.sshd.user_key_ref,
                    "known_hosts": str(self.sshd.known_hosts_path), "connect_timeout": 2},
            "guests": guests,
            "roles": roles or {},
        }
        path = self.workdir / name
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path

    def load(self, guests: list[dict[str, Any]], **kw: Any) -> Inventory:
        return load_inventory(self.write(guests, **kw))

    def api(self, inv: Inventory) -> Any:
        assert inv.proxmox is not None
        return px.connect(inv.proxmox)

    def config(self, vmid: int) -> dict[str, Any]:
        guest = self.sim.guest(vmid)
        assert guest is not None, f"guest {vmid} does not exist"
        return guest["config"]

    def writes(self) -> list[dict[str, Any]]:
        return [r for r in self.sim.requests if r["method"] != "GET"]


@pytest.fixture
def pve(tmp_path: Path, local_sshd: LocalSshd) -> Iterator[Pve]:
    secret = str(uuid.uuid4())
    secret_file = tmp_path / "pve-token"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    sim = Simulator(nodes=("pve1", "pve2"), task_duration=0.01, tokens={TOKEN_ID: secret})
    sim.start()
    try:
        yield Pve(sim, secret_file, tmp_path, local_sshd)
    finally:
        sim.stop()


def lxc(name: str, vmid: int, pve: Pve | None = None, **over: Any) -> dict[str, Any]:
    """An LXC guest; with ``pve`` its SSH is the local sshd."""
    g: dict[str, Any] = {
        "name": name, "vmid": vmid, "type": "lxc", "node": "pve1", "template": TEMPLATE,
        "resources": {"cores": 1, "memory_mb": 512, "swap_mb": 256, "disk_gb": 4,
                      "storage": "local-lvm"},
        "network": [{"ip": f"10.0.0.{vmid % 200 + 10}/24", "gateway": "10.0.0.1"}],
        "tags": ["labkeeper", "test"],
    }
    if pve is not None:
        g["ssh"] = {"address": "127.0.0.1", "port": pve.sshd.port}
    g.update(over)
    return g


def qemu(name: str, vmid: int, **over: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "name": name, "vmid": vmid, "type": "qemu", "node": "pve1", "template": "9000",
        "resources": {"cores": 2, "sockets": 1, "memory_mb": 1024, "disk_gb": 8,
                      "storage": "local-lvm"},
        "network": [{"ip": f"10.0.1.{vmid % 200 + 10}/24", "gateway": "10.0.1.1"}],
        "tags": ["labkeeper"],
        "cloud_init": {"user": "admin", "ssh_keys": [
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl "
            "admin@lab"]},
    }
    g.update(over)
    return g


def apply(pve: Pve, inv: Inventory, **opts: Any) -> pv.ApplyReport:
    options = pv.ApplyOptions(**opts)
    plan = pv.read_plan(pve.api(inv), inv)
    runner = pv.local_runner(lambda: pve.api(inv), inv, options)
    return pv.apply_plan(plan, inv, options, runner)


def statuses(report: pv.ApplyReport, guest: str) -> dict[str, str]:
    return {r.step: r.status for r in report.results if r.guest == guest}


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    """(logger, level, message) of each record the steps logged."""
    return [(r.name, r.levelno, r.getMessage()) for r in caplog.records
            if r.name.startswith("labkeeper.provision")]


# ------------------------------------------------------------------------------- plan


def test_plan_cli_on_an_empty_cluster_lists_creates_and_sends_only_gets(pve: Pve, capsys):
    path = pve.write([lxc("web", 200, pve), qemu("vm", 201)])
    pve.sim.requests.clear()
    code = plan_cli(path, json_out=True)
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    actions = {g["name"]: g["action"] for g in out["guests"]}
    assert actions == {"web": "create", "vm": "create", "debian12-cloudinit": "unmanaged"}
    assert out["counts"] == {"create": 2, "unmanaged": 1}
    assert pve.sim.requests, "the plan read nothing"
    assert {r["method"] for r in pve.sim.requests} == {"GET"}
    assert pve.sim.guest(200) is None
    assert plan_cli(path, json_out=False) == 0
    table = capsys.readouterr().out
    assert "web" in table and "create" in table


# ------------------------------------------------------------------------------- apply


def test_apply_creates_starts_and_waits_for_ssh_then_a_second_apply_changes_nothing(pve: Pve):
    inv = pve.load([lxc("web", 200, pve, features={"nesting": True}, startup_order=2),
                    qemu("vm", 201)])
    report = apply(pve, inv)
    assert report.ok, report.rows()
    assert statuses(report, "web") == {"create": "changed", "configure": "unchanged",
                                       "start": "changed", "wait-ssh": "ok"}
    assert statuses(report, "vm")["configure"] == "changed"  # clone, then resources
    web, vm = pve.sim.guest(200), pve.sim.guest(201)
    assert web is not None and vm is not None
    assert web["status"] == "running" and vm["status"] == "running"
    assert web["config"]["hostname"] == "web"
    assert set(web["config"]["tags"].split(";")) == {"labkeeper", "test"}
    assert web["config"]["features"] == "nesting=1"
    assert web["config"]["rootfs"].endswith("size=4G")
    assert vm["config"]["scsi0"].endswith("size=8G")
    assert vm["config"]["ciuser"] == "admin" and vm["config"]["ipconfig0"].startswith("ip=10.0.1")
    assert "description" not in web["config"]

    plan = pv.read_plan(pve.api(inv), inv)
    assert plan.is_empty, plan.table()
    pve.sim.requests.clear()
    again = apply(pve, inv)
    assert again.ok
    assert {r.status for r in again.results} <= {"unchanged", "ok"}, again.rows()
    assert pve.writes() == []


def test_lxc_resource_change_is_applied_live_without_restart(pve: Pve):
    inv = pve.load([lxc("web", 200)])
    assert apply(pve, inv).ok
    bigger = lxc("web", 200, resources={"cores": 2, "memory_mb": 1024, "swap_mb": 512,
                                        "disk_gb": 4, "storage": "local-lvm"})
    inv2 = pve.load([bigger], name="lab2.yaml")
    plan = pv.read_plan(pve.api(inv2), inv2)
    gp = plan.guest("web")
    assert gp.action == "change" and not gp.needs_restart
    assert {c.key for c in gp.changes} == {"cores", "memory", "swap"}
    report = apply(pve, inv2)
    assert report.ok
    cfg = pve.config(200)
    assert (cfg["cores"], cfg["memory"], cfg["swap"]) == (2, 1024, 512)
    assert not [r for r in pve.sim.requests if r["path"].endswith("/status/shutdown")]
    assert pv.read_plan(pve.api(inv2), inv2).is_empty


def test_qemu_memory_change_needs_restart_and_waits_for_allow_restart(pve: Pve):
    inv = pve.load([qemu("vm", 201)])
    assert apply(pve, inv).ok
    inv2 = pve.load([qemu("vm", 201, resources={"cores": 2, "memory_mb": 2048, "disk_gb": 8,
                                                 "storage": "local-lvm"})], name="lab2.yaml")
    gp = pv.read_plan(pve.api(inv2), inv2).guest("vm")
    assert gp.needs_restart and "memory: 1024 → 2048 [restart]" in gp.summary()
    held = apply(pve, inv2)
    assert statuses(held, "vm")["configure"] == "held"
    assert str(pve.config(201)["memory"]) == "1024"
    done = apply(pve, inv2, allow_restart=True)
    assert done.ok
    assert str(pve.config(201)["memory"]) == "2048"
    assert [r for r in pve.sim.requests if r["path"].endswith("/201/status/shutdown")]
    assert pve.sim.guest(201)["status"] == "running"  # type: ignore[index]


def test_disk_grows_and_never_shrinks(pve: Pve, caplog):
    caplog.set_level(logging.INFO, logger="labkeeper")
    inv = pve.load([lxc("web", 200)])
    assert apply(pve, inv).ok

    def with_disk(gb: int, name: str) -> Inventory:
        return pve.load([lxc("web", 200, resources={"cores": 1, "memory_mb": 512,
                                                    "swap_mb": 256, "disk_gb": gb,
                                                    "storage": "local-lvm"})], name=name)

    grow = with_disk(6, "grow.yaml")
    gp = pv.read_plan(pve.api(grow), grow).guest("web")
    assert [c.text() for c in gp.changes] == ["rootfs: 4G → 6G (grow)"]
    assert apply(pve, grow).ok
    assert pve.config(200)["rootfs"].endswith("size=6G")
    assert ("labkeeper.provision.converge", logging.INFO,
            "web: growing rootfs 4G → 6G") in logged(caplog)

    shrink = with_disk(2, "shrink.yaml")
    plan = pv.read_plan(pve.api(shrink), shrink)
    assert plan.problems == ["web (200): rootfs: disks never shrink"]
    report = apply(pve, shrink)
    assert not report.ok
    assert statuses(report, "web")["configure"] == "failed"
    assert "disks never shrink" in next(r.detail for r in report.results
                                        if r.step == "configure")
    assert pve.config(200)["rootfs"].endswith("size=6G")
    assert not [r for r in pve.sim.requests if r["path"].endswith("/resize")
                and r["status"] != 200]


def test_guests_without_the_managed_tag_are_never_touched(pve: Pve):
    pve.sim.add_guest(150, "lxc", config={"hostname": "foreign", "memory": 256},
                      status="running")
    pve.sim.add_guest(200, "lxc", config={"hostname": "squatter", "memory": 256})
    inv = pve.load([lxc("web", 200), lxc("db", 210)])
    plan = pv.read_plan(pve.api(inv), inv)
    assert plan.guest("foreign").action == "unmanaged"
    assert plan.guest("web").action == "conflict"
    assert "without the 'labkeeper' tag" in plan.guest("web").problems[0]
    pve.sim.requests.clear()
    report = apply(pve, inv)
    assert not report.ok and report.failed == ["web"]
    assert statuses(report, "db")["start"] == "changed"  # the others go on
    touched = [r["path"] for r in pve.writes()]
    assert not [p for p in touched if "/150" in p or "/200" in p], touched
    assert pve.config(200)["hostname"] == "squatter"
    assert pve.sim.guest(150)["status"] == "running"  # type: ignore[index]


def test_missing_template_is_a_clear_error_naming_the_storage_and_its_templates(pve: Pve):
    inv = pve.load([lxc("web", 200, template="local:vztmpl/alpine-3.20-default.tar.xz")])
    plan = pv.read_plan(pve.api(inv), inv)
    (problem,) = plan.problems
    assert "alpine-3.20-default.tar.xz not found in storage 'local' on pve1" in problem
    assert "debian-12-standard_12.7-1_amd64.tar.zst" in problem
    report = apply(pve, inv)
    assert not report.ok
    assert not [r for r in pve.sim.requests if r["method"] == "POST"]
    # the create step itself checks too (a stale plan cannot slip past it)
    guest = inv.guest("web")
    with pytest.raises(pv.ProvisionError, match=r"templates there: .*debian-12"):
        pv.create_guest(pve.api(inv), inv, guest)


def test_failed_creation_task_leaves_nothing_and_is_reported(pve: Pve):
    inv = pve.load([lxc("web", 200, pve)])
    pve.sim.faults.fail_tasks("vzcreate", "unable to create CT 200 - disk full")
    report = apply(pve, inv)
    assert not report.ok and report.failed == ["web"]
    create = next(r for r in report.results if r.step == "create")
    assert create.status == "failed" and "disk full" in create.detail
    cleanup = next(r for r in report.results if r.step == "cleanup")
    assert cleanup.status == "cleanup" and "nothing left behind" in cleanup.detail
    assert pve.sim.guest(200) is None


def test_failed_start_destroys_the_half_made_guest(pve: Pve, caplog):
    caplog.set_level(logging.INFO, logger="labkeeper")
    inv = pve.load([lxc("web", 200, pve)])
    pve.sim.faults.fail_tasks("vzstart", "startup for container '200' failed")
    report = apply(pve, inv)
    assert not report.ok
    assert statuses(report, "web") == {"create": "changed", "configure": "unchanged",
                                       "start": "failed", "cleanup": "cleanup"}
    assert pve.sim.guest(200) is None
    assert report.left_for_cleanup == []
    said = logged(caplog)
    assert said[:2] == [
        ("labkeeper.provision.create", logging.INFO,
         f"web: creating LXC 200 on pve1 from {TEMPLATE}"),
        ("labkeeper.provision.converge", logging.INFO, "web: starting lxc 200")], said
    failed = next(r for r in report.results if r.step == "start").detail
    assert said[2:] == [
        ("labkeeper.provision.apply", logging.WARNING, f"web: start failed: {failed}"),
        ("labkeeper.provision.destroy", logging.WARNING,
         f"web: creation failed (start failed: {failed.split(': ', 1)[1]}); destroying the "
         "half-made guest")], said


def test_failed_start_with_cleanup_report_leaves_the_guest_and_names_it(pve: Pve):
    inv = pve.load([lxc("web", 200, pve, cleanup_on_failure="report")])
    pve.sim.faults.fail_tasks("vzstart", "startup for container '200' failed")
    report = apply(pve, inv)
    assert report.left_for_cleanup == ["web (200)"]
    assert "LEFT FOR CLEANUP" in next(r.detail for r in report.results if r.step == "cleanup")
    assert pve.sim.guest(200) is not None
    assert "left for cleanup: web (200)" in report.summary()


def test_ssh_that_never_comes_up_fails_and_the_guest_is_destroyed(pve: Pve):
    dead = lxc("web", 200, ssh={"address": "127.0.0.1", "port": free_port("127.0.0.1")})
    inv = pve.load([dead], provision={"ssh_wait_timeout": 1.5})
    report = apply(pve, inv)
    wait = next(r for r in report.results if r.step == "wait-ssh")
    assert wait.status == "failed" and "did not answer within 1.5s" in wait.detail
    assert statuses(report, "web")["cleanup"] == "cleanup"
    assert pve.sim.guest(200) is None
    stops = [r for r in pve.sim.requests if r["path"].endswith("/200/status/stop")]
    assert stops, "a running half-made guest is stopped before it is destroyed"


def test_crash_between_create_and_start_converges_on_rerun(pve: Pve):
    inv = pve.load([lxc("web", 200, pve)])
    first = pv.create_guest(pve.api(inv), inv, inv.guest("web"))  # ... and then we "crash"
    assert first.status == "changed"
    assert pve.sim.guest(200)["status"] == "stopped"  # type: ignore[index]
    gp = pv.read_plan(pve.api(inv), inv).guest("web")
    assert gp.action == "change"
    assert [c.text() for c in gp.changes] == ["start (stopped → running)"]
    report = apply(pve, inv)
    assert report.ok
    assert statuses(report, "web") == {"start": "changed", "wait-ssh": "ok"}
    assert pv.read_plan(pve.api(inv), inv).is_empty
    # the create step itself is idempotent too
    assert pv.create_guest(pve.api(inv), inv, inv.guest("web")).status == "unchanged"


def test_two_creations_racing_for_one_vmid_have_exactly_one_winner(pve: Pve):
    inv = pve.load([lxc("web", 200)])
    api = pve.api(inv)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def create(i: int) -> None:
        barrier.wait()
        try:
            upid = px.create_lxc(api, "pve1", 300, TEMPLATE, hostname=f"racer{i}",
                                 rootfs="local-lvm:1")
            px.wait_for_task(api, upid, timeout=10, poll=0.02)
            outcomes.append("ok")
        except (ServiceError, px.ProxmoxTaskError) as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("ok") == 1, outcomes
    assert all("already exists" in o for o in outcomes if o != "ok")
    # and labkeeper's own create step refuses a vmid someone else holds
    pve.sim.add_guest(200, "lxc", config={"hostname": "other", "tags": "labkeeper"},
                      node="pve2")
    with pytest.raises(pv.VmidTaken, match="vmid 200 is taken"):
        pv.create_guest(api, inv, inv.guest("web"))


def test_protected_guest_is_never_modified(pve: Pve):
    pve.sim.add_guest(200, "lxc", config={"hostname": "web", "memory": 256, "cores": 1,
                                          "tags": "labkeeper;test", "protection": 1})
    inv = pve.load([lxc("web", 200), lxc("gone", 210, state="absent")])
    plan = pv.read_plan(pve.api(inv), inv)
    gp = plan.guest("web")
    assert gp.action == "protected" and "memory: 256 → 512" in gp.summary()
    pve.sim.requests.clear()
    report = apply(pve, inv)
    assert pve.writes() == []
    assert pve.config(200)["memory"] == 256
    assert report.ok  # reported, not an error


def test_plan_touching_too_many_guests_needs_yes(pve: Pve):
    inv = pve.load([lxc("a", 200), lxc("b", 201), lxc("c", 202)],
                   provision={"max_changes_without_yes": 2})
    plan = pv.read_plan(pve.api(inv), inv)
    assert plan.needs_yes and "apply needs `--yes`" in plan.markdown()
    with pytest.raises(pv.TooManyChanges, match=r"touches 3 guests.*--yes"):
        apply(pve, inv)
    assert pve.writes() == []
    assert apply(pve, inv, yes=True).ok
    assert all(pve.sim.guest(v) for v in (200, 201, 202))


def test_absent_guest_is_destroyed_only_with_allow_destroy(pve: Pve, caplog):
    inv = pve.load([lxc("web", 200)])
    assert apply(pve, inv).ok
    gone = pve.load([lxc("web", 200, state="absent")], name="gone.yaml")
    gp = pv.read_plan(pve.api(gone), gone).guest("web")
    assert gp.action == "destroy"
    held = apply(pve, gone)
    assert statuses(held, "web") == {"destroy": "held"}
    assert pve.sim.guest(200) is not None
    caplog.set_level(logging.INFO, logger="labkeeper")
    caplog.clear()
    done = apply(pve, gone, allow_destroy=True)
    assert statuses(done, "web") == {"destroy": "changed"}
    assert logged(caplog) == [("labkeeper.provision.destroy", logging.INFO,
                               "web: destroying lxc 200 on pve1")]
    assert pve.sim.guest(200) is None
    assert pv.read_plan(pve.api(gone), gone).guest("web").action == "absent"
