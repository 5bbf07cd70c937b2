"""Guest DR drills against a Proxmox simulator of our own (real HTTPS API, schema-checked)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
        path = e.inventory([])
        api = px.connect(load_inventory(path).proxmox)
        px.wait_for_task(api, px.vzdump(api, "pve1", vmids=[vmid], storage="local"),
                         timeout=30, poll=0.05)
        yield e, vmid, api
    finally:
        e.stop()


def _inventory(env, vmid: int, **drill_kw):
    import yaml

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
                     "guests": {"scratch_vmids": {"first": 9900, "last": 9910}}}
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
