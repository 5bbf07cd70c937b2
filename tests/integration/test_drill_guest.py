"""Guest DR drills against a Proxmox simulator of our own (real HTTPS API, schema-checked)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
import yaml

from labkeeper import drill
from labkeeper import proxmox as px
from labkeeper.inventory import load_inventory
from labkeeper.pvesim.api import add_guest
from tests.integration.test_vzdump_support import VzEnv, next_vmid

pytestmark = pytest.mark.integration

NET0 = "name=eth0,bridge=vmbr0,ip=dhcp,hwaddr=BC:24:11:00:00:01"


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[VzEnv, int, object]]:
    e = VzEnv(lab, tmp_path_factory.mktemp("drill-guest"))
    try:
        vmid = next_vmid()
        add_guest(e.sim, vmid, "lxc", "pve1", config={"hostname": "drillme", "net0": NET0},
                  status="running")
        rootfs = e.workdir / "drillme-rootfs"  # archived by vzdump, unpacked by the restore
        (rootfs / "etc").mkdir(parents=True)
        (rootfs / "etc" / "hostname").write_text("drillme\n")
        e.sim.set_rootfs_dir(vmid, rootfs)
        path = e.inventory([])
        api = px.connect(load_inventory(path).proxmox)
        px.wait_for_task(api, px.vzdump(api, "pve1", vmids=[vmid], storage="local"),
                         timeout=30, poll=0.05)
        yield e, vmid, api
    finally:
        e.stop()


def _inventory(env, vmid: int, *, guests: dict | None = None, **drill_kw):
    e, _vmid, _api = env
    path = e.inventory([])
    inv = yaml.safe_load(path.read_text())
    inv["guests"] = [{
        "name": "drillme", "vmid": vmid, "type": "lxc", "node": "pve1",
        "template": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "resources": {"cores": 1, "memory_mb": 512, "disk_gb": 4, "storage": "local-lvm"},
        "network": [{"name": "eth0", "bridge": "vmbr0", "ip": "dhcp"}],
        "drill": {"rto_minutes": 30, "rpo_hours": 26, **drill_kw}}]
    inv["drills"] = {**inv.get("drills", {}),
                     "guests": {"scratch_vmids": {"first": 9900, "last": 9910},
                                **(guests or {})}}
    for demo_only in ("roles", "apps", "path_backups"):
        inv.pop(demo_only, None)
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return load_inventory(path)


def test_guest_drill_restores_to_a_scratch_vmid_isolated_boots_and_destroys_it(env):
    e, vmid, api = env
    inv = _inventory(env, vmid)
    add_guest(e.sim, 9900, "lxc", "pve2", status="stopped")  # an existing one is skipped
    try:
        result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
        assert result.passed, result.summary()
        assert result.scratch == "VMID 9901 on pve1"
        assert result.source.startswith(f"local:backup/vzdump-lxc-{vmid}-")
        checks = {c.name: c for c in result.checks}
        assert checks["network isolated"].detail == "1 NIC(s) detached"
        assert checks["running"].ok and checks["rto"].ok and checks["rpo"].ok
        assert e.sim.guest(9901) is None, "the scratch guest was not destroyed"
        assert e.sim.guest(vmid)["status"] == "running", "the real guest was touched"
    finally:
        px.wait_for_task(api, px.destroy_guest(api, "pve2", 9900, "lxc"), timeout=30)


def test_a_failing_restore_task_fails_the_guest_drill_loudly(env):
    e, vmid, api = env
    inv = _inventory(env, vmid)
    e.sim.faults.fail_tasks("vzrestore", "simulated: archive is corrupt (zstd: data error)")
    try:
        result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    finally:
        e.sim.faults.clear()
    assert not result.passed
    assert "vzrestore" in result.error and "zstd: data error" in result.error
    assert e.sim.guest(9900) is None


def test_guest_drill_on_an_isolated_bridge_and_objectives_breached(env):
    e, vmid, api = env
    inv = _inventory(env, vmid, rto_minutes=0.0001, rpo_hours=0.00001)
    inv = inv.model_copy(update={"drills": inv.drills.model_copy(update={
        "guests": inv.drills.guests.model_copy(update={"bridge": "vmbr99",
                                                       "keep_on_failure": True})})})
    result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    try:
        assert not result.passed and result.rto_breached and result.rpo_breached
        assert result.kept == "VMID 9900 on pve1"
        kept = e.sim.guest(9900)
        assert kept is not None and "bridge=vmbr99" in kept["config"]["net0"]
        assert kept["config"]["onboot"] in (0, "0") and kept["status"] == "running"
        assert "DR drill of drillme" in kept["config"]["description"]
    finally:
        px.wait_for_task(api, px.stop_guest(api, "pve1", 9900, "lxc"), timeout=30)
        px.wait_for_task(api, px.destroy_guest(api, "pve1", 9900, "lxc"), timeout=30)


def test_guest_drill_copy_has_no_bind_mount_or_passthrough_device_of_the_original(env):
    e, _vmid, api = env
    vmid = next_vmid()
    add_guest(e.sim, vmid, "lxc", "pve1", status="running", config={
        "hostname": "mounty", "net0": NET0, "mp0": "/srv/shared-photos,mp=/photos",
        "dev0": "/dev/ttyUSB0,mode=0660"})
    px.wait_for_task(api, px.vzdump(api, "pve1", vmids=[vmid], storage="local"),
                     timeout=30, poll=0.05)
    inv = _inventory(env, vmid, rto_minutes=0.0001)  # breached: the copy is kept to look at
    inv = inv.model_copy(update={"drills": inv.drills.model_copy(update={
        "guests": inv.drills.guests.model_copy(update={"keep_on_failure": True})})})
    try:
        result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
        assert result.kept == "VMID 9900 on pve1", result.summary()
        copy = e.sim.guest(9900)["config"]
        assert "mp0" not in copy and "dev0" not in copy, copy
        checks = {c.name: c for c in result.checks}
        assert checks["host mounts/devices removed"].detail == "dev0, mp0"
        original = e.sim.guest(vmid)["config"]
        assert original["mp0"].startswith("/srv/shared-photos") and "dev0" in original
    finally:
        for vm in (9900, vmid):
            if e.sim.guest(vm) is not None:
                px.wait_for_task(api, px.stop_guest(api, "pve1", vm, "lxc"), timeout=30)
                px.wait_for_task(api, px.destroy_guest(api, "pve1", vm, "lxc"), timeout=30)


# -- scratch copies left by drills that died ---------------------------------------------------

def _marked(created: datetime, *extra_tags: str) -> dict[str, str]:
    return {"tags": ";".join([drill.SCRATCH_TAG, *extra_tags]),
            "description": "labkeeper DR drill of drillme: scratch copy\n"
                           f"labkeeper-drill-scratch created={created:%Y-%m-%dT%H:%M:%SZ}"}


def test_a_marked_stale_scratch_copy_is_swept_and_unmarked_guests_are_never_touched(env):
    e, vmid, api = env
    inv = _inventory(env, vmid)
    now = datetime.now(tz=UTC)
    add_guest(e.sim, 9905, "lxc", "pve2", config=_marked(now - timedelta(days=2)),
              status="running")  # a drill died two days ago
    add_guest(e.sim, 9906, "lxc", "pve1", config={"tags": "labkeeper-drill",
                                                   "description": "someone's own test"})
    add_guest(e.sim, 9907, "qemu", "pve1", config={"description": "a real VM in the range"},
              status="running")
    add_guest(e.sim, 9908, "lxc", "pve1", config=_marked(now - timedelta(minutes=5)))
    add_guest(e.sim, 9909, "lxc", "pve1",
              config=_marked(now - timedelta(days=9), drill.KEPT_TAG))
    others = (9906, 9907, 9908, 9909)
    try:
        result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
        assert result.passed, result.summary()
        assert e.sim.guest(9905) is None, "the stale marked copy was not swept"
        for untouched in others:
            assert e.sim.guest(untouched) is not None, f"VMID {untouched} was destroyed"
        assert e.sim.guest(9907)["status"] == "running"
        sweep = next(c for c in result.checks if c.name == "leftover scratch guests")
        assert sweep.ok and sweep.detail == "destroyed VMID 9905 (left by drills that died)"
        notes = "\n".join(result.notes)
        assert "VMID 9906 is tagged labkeeper-drill but has no labkeeper marker" in notes
        assert "VMID 9908 on pve1 was created" in notes and "left alone" in notes
        assert "VMID 9909 on pve1 was kept from a failed drill" in notes
        assert "9907" not in notes  # untagged: not even looked at
        assert result.scratch == "VMID 9900 on pve1"  # the swept VMID range is reused
    finally:
        for vm in others:
            g = e.sim.guest(vm)
            if g is None:
                continue
            if g["status"] == "running":
                px.wait_for_task(api, px.stop_guest(api, g["node"], vm, g["type"]),
                                 timeout=30)
            px.wait_for_task(api, px.destroy_guest(api, g["node"], vm, g["type"]), timeout=30)


def test_a_copy_kept_on_failure_is_tagged_kept_and_the_next_drill_reports_it(env):
    e, vmid, api = env
    inv = _inventory(env, vmid, rpo_hours=0.00001, guests={"keep_on_failure": True})
    kept = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    try:
        assert not kept.passed and kept.kept == "VMID 9900 on pve1"
        assert e.sim.guest(9900)["config"]["tags"] == "labkeeper-drill;labkeeper-drill-kept"
        again = drill.guest_drill(_inventory(env, vmid), "drillme", api=api, poll=0.05,
                                  now=lambda: datetime.now(tz=UTC) + timedelta(days=30))
        assert e.sim.guest(9900) is not None, "a kept copy was swept"
        assert any("VMID 9900 on pve1 was kept from a failed drill" in n for n in again.notes)
        assert again.scratch == "VMID 9901 on pve1"
    finally:
        px.wait_for_task(api, px.stop_guest(api, "pve1", 9900, "lxc"), timeout=30)
        px.wait_for_task(api, px.destroy_guest(api, "pve1", 9900, "lxc"), timeout=30)


# -- proving the copy came up: ssh and probes ---------------------------------------------------
# The simulator has no guest OS: the lab's sshd (this machine) stands in for the copy's
# sshd, as it does for every simulated guest. A command probe reads the copy's root
# filesystem, which the simulator unpacked from the archive on this machine.

BRIDGE = {"bridge": "vmbr99", "boot_timeout": 1.5}


def _copy_file(e, scratch: int) -> str:
    return str(e.sim.data_dir / "rootfs" / str(scratch) / "etc" / "hostname")


def test_ssh_check_logs_in_to_the_copys_drill_address(env, lab):
    e, vmid, api = env
    inv = _inventory(env, vmid, check="ssh", address=lab.sshd.host, guests=BRIDGE)
    result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    assert result.passed, result.summary()
    ssh = next(c for c in result.checks if c.name == "ssh")
    assert ssh.detail.startswith(f"SSH login {lab.sshd.user}@{lab.sshd.host}:{lab.sshd.port} "
                                 "ok (uname -n: ")
    assert e.sim.guest(9900) is None


def test_ssh_check_that_cannot_log_in_fails_the_drill_after_retrying(env, lab):
    e, vmid, api = env
    inv = _inventory(env, vmid, check="ssh", address="127.0.0.3", guests=BRIDGE)
    result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    assert not result.passed
    ssh = next(c for c in result.checks if c.name == "ssh")
    assert not ssh.ok and f"SSH login {lab.sshd.user}@127.0.0.3:{lab.sshd.port} failed" \
        in ssh.detail
    assert int(ssh.detail.rsplit("attempt ", 1)[1].rstrip(")")) > 1, "not retried"
    assert "ssh: SSH login" in result.summary()
    assert e.sim.guest(9900) is None  # destroyed all the same


def test_ssh_check_without_a_drill_bridge_fails_instead_of_falling_back_to_status(env, lab):
    _e, vmid, api = env
    inv = _inventory(env, vmid, check="ssh", address=lab.sshd.host)
    result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    assert not result.passed
    assert {c.name: c.ok for c in result.checks}["ssh"] is False
    assert "drills.guests.bridge is not set" in result.summary()


def test_command_probe_reads_the_restored_root_filesystem(env):
    e, vmid, api = env
    probe = {"command": {"argv": ["cat", _copy_file(e, 9900)], "stdout_contains": "drillme"},
             "timeout": 20}
    inv = _inventory(env, vmid, check="probe", probe=probe, address="127.0.0.1", guests=BRIDGE)
    result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    assert result.passed, result.summary()
    check = next(c for c in result.checks if c.name.startswith("probe command cat "))
    assert check.detail.startswith("exit 0 on 127.0.0.1:")


@pytest.mark.parametrize(("probe", "says"), [
    ({"command": {"argv": ["cat", "/nonexistent/etc/hostname"], "stdout_contains": "drillme"},
      "timeout": 20}, "exit 1, expected 0"),
    ({"tcp": {"port": 1}, "timeout": 1}, "cannot connect to 127.0.0.1:1"),
    ({"http": {"url": "http://127.0.0.1:1/health"}, "timeout": 1}, "request failed"),
])
def test_a_failing_probe_fails_the_guest_drill(env, probe, says):
    e, vmid, api = env
    inv = _inventory(env, vmid, check="probe", probe=probe, address="127.0.0.1",
                     guests=BRIDGE)
    result = drill.guest_drill(inv, "drillme", api=api, poll=0.05)
    assert not result.passed
    failed = [c for c in result.failed_checks if c.name.startswith("probe ")]
    assert failed and says in failed[0].detail, result.summary()
    assert e.sim.guest(9900) is None
