"""Provisioning and ``managed: false`` (what ``labkeeper init`` writes for guests it
cannot or may not manage), and PVE's per-type defaults in the plan's comparison."""

from __future__ import annotations

from labkeeper import provision as pv
from labkeeper.inventory import parse_inventory, validate_text
from tests.unit.test_provision import inventory, lxc, lxc_config, pve_guest


def test_a_guest_marked_managed_false_is_left_alone_even_when_it_differs():
    inv = inventory([lxc("web", 200, managed=False, resources={
        "cores": 8, "memory_mb": 4096, "disk_gb": 8, "storage": "local-lvm"})])
    actual = pv.Actual(guests={200: pve_guest(200, tags="web", status="stopped")},
                       configs={200: lxc_config(200, "web", tags="web")})
    plan = pv.make_plan(inv, actual)
    gp = plan.guest("web")
    assert gp.action == "unmanaged" and gp.in_inventory and gp.changes == ()
    assert "managed: false" in gp.notes[0]
    assert plan.is_empty
    assert pv.steps_for(gp, inv.guest("web"), pv.ApplyOptions()) == []


def test_a_managed_false_guest_missing_from_proxmox_is_not_created():
    inv = inventory([lxc("gone", 201, managed=False)])
    plan = pv.make_plan(inv, pv.Actual())
    assert plan.guest("gone").action == "unmanaged" and plan.is_empty


def test_a_managed_false_guest_needs_no_template_but_a_managed_one_does():
    text = """
version: 1
lab: {name: unit}
proxmox:
  host: 127.0.0.1
  token_id: a@pve!b
  token_secret: env:PVE
  nodes: [{name: pve1}]
  storages: [{name: local-lvm, type: lvmthin, content: [images, rootdir]}]
guests:
  - {name: a, vmid: 100, type: qemu, node: pve1, managed: false,
     resources: {storage: local-lvm}}
"""
    assert validate_text(text) == []
    assert parse_inventory(text).guest("a").managed is False
    problems = validate_text(text.replace("managed: false,", ""))
    assert any("template is required" in p.message for p in problems)


def test_options_pve_defaults_per_type_compare_equal_when_absent():
    assert pv.same_value("lxc", "swap", None, "512")
    assert pv.same_value("lxc", "memory", None, "512")
    assert pv.same_value("qemu", "cores", None, "1")
    assert pv.same_value("qemu", "sockets", None, "1")
    assert not pv.same_value("lxc", "cores", None, "1")  # no cores: no CPU limit
    assert not pv.same_value("lxc", "swap", None, "256")
