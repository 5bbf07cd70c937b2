"""Pure parts of provisioning: desired config, diff → plan, plan output, step order."""

from __future__ import annotations

import json
from typing import Any

import yaml

from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.inventory import Inventory, parse_inventory

TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


def inventory(guests: list[dict[str, Any]], **settings: Any) -> Inventory:
    data = {
        "version": 1, "lab": {"name": "unit"},
        "settings": {"provision": settings} if settings else {},
        "proxmox": {"host": "127.0.0.1", "token_id": "a@pve!b", "token_secret": "env:PVE",
                    "nodes": [{"name": "pve1"}],
                    "storages": [{"name": "local", "type": "dir", "content": ["vztmpl"]},
                                 {"name": "local-lvm", "type": "lvmthin",
                                  "content": ["images", "rootdir"]}]},
        "guests": guests,
    }
    return parse_inventory(yaml.safe_dump(data))


def lxc(name: str, vmid: int, **over: Any) -> dict[str, Any]:
    g = {"name": name, "vmid": vmid, "type": "lxc", "node": "pve1", "template": TEMPLATE,
         "resources": {"cores": 2, "memory_mb": 1024, "swap_mb": 512, "disk_gb": 8,
                       "storage": "local-lvm"},
         "network": [{"ip": f"10.0.0.{vmid % 100 + 10}/24", "gateway": "10.0.0.1"}],
         "tags": ["labkeeper", "web"], "description": "the web server"}
    g.update(over)
    return g


def pve_guest(vmid: int, gtype: str = "lxc", *, tags: str = "labkeeper;web",
              status: str = "running", name: str = "", template: bool = False) -> px.Guest:
    return px.Guest.model_validate({"vmid": vmid, "type": gtype, "node": "pve1", "name": name,
                                    "status": status, "tags": tags, "template": template})


def lxc_config(vmid: int, name: str, **over: Any) -> dict[str, Any]:
    cfg = {"hostname": name, "cores": 2, "memory": 1024, "swap": 512, "onboot": 1,
           "tags": "web;labkeeper", "unprivileged": 1,
           "net0": f"name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=10.0.0.{vmid % 100 + 10}"
                   "/24,gw=10.0.0.1,type=veth",
           "rootfs": f"local-lvm:vm-{vmid}-disk-0,size=8G", "description": "the web server"}
    cfg.update(over)
    return cfg


def test_desired_lxc_config_carries_the_managed_tag_and_the_description():
    g = inventory([lxc("web", 200, tags=["web"], startup_order=3)]).guest("web")
    cfg = pv.desired_config(g, "labkeeper")
    assert cfg["tags"] == "labkeeper;web"
    assert cfg["net0"] == "name=eth0,bridge=vmbr0,ip=10.0.0.10/24,gw=10.0.0.1"
    assert cfg["startup"] == "order=3" and cfg["onboot"] == "1"
    assert cfg["description"] == "the web server"
    assert "description" not in pv.desired_config(g, "labkeeper", with_description=False)


def test_same_value_ignores_pve_added_nic_fields_and_tag_order():
    assert pv.same_value("lxc", "net0", "name=eth0,bridge=vmbr0,hwaddr=AA:BB:CC:00:11:22,"
                         "ip=dhcp,type=veth", "name=eth0,bridge=vmbr0,ip=dhcp")
    assert not pv.same_value("lxc", "net0", "name=eth0,bridge=vmbr1,ip=dhcp",
                             "name=eth0,bridge=vmbr0,ip=dhcp")
    assert pv.same_value("qemu", "net0", "virtio=BC:24:11:9A:00:01,bridge=vmbr0",
                         "virtio,bridge=vmbr0")
    assert pv.same_value("lxc", "tags", "web;labkeeper", "labkeeper;web")
    assert pv.same_value("qemu", "memory", "2048", "2048")
    assert pv.same_value("lxc", "onboot", None, "0")
    assert pv.merged_net("qemu", "virtio=BC:24:11:9A:00:01,bridge=vmbr0",
                         "virtio,bridge=vmbr1") == "virtio=BC:24:11:9A:00:01,bridge=vmbr1"


def test_plan_shows_every_kind_of_change():
    inv = inventory([
        lxc("new", 200),
        lxc("same", 201),
        lxc("bigger", 202, resources={"cores": 4, "memory_mb": 1024, "swap_mb": 512,
                                      "disk_gb": 16, "storage": "local-lvm"}),
        lxc("smaller", 203, resources={"cores": 2, "memory_mb": 1024, "swap_mb": 512,
                                       "disk_gb": 4, "storage": "local-lvm"}),
        lxc("stopped", 204),
        lxc("gone", 205, state="absent"),
        lxc("locked-down", 206),
        lxc("squatted", 207),
        {"name": "vm", "vmid": 208, "type": "qemu", "node": "pve1", "template": "9000",
         "resources": {"cores": 4, "memory_mb": 4096, "disk_gb": 8, "storage": "local-lvm"},
         "tags": ["labkeeper"]},
    ])
    guests = {v: pve_guest(v) for v in (201, 202, 203, 205, 206)}
    guests[204] = pve_guest(204, status="stopped")
    guests[207] = pve_guest(207, tags="", name="theirs")
    guests[208] = pve_guest(208, "qemu", tags="labkeeper")
    guests[9000] = pve_guest(9000, "qemu", tags="", name="tmpl", template=True)
    guests[150] = pve_guest(150, tags="", name="foreign")
    names = {201: "same", 202: "bigger", 203: "smaller", 204: "stopped", 205: "gone",
             206: "locked-down"}
    configs = {v: lxc_config(v, n) for v, n in names.items()}
    configs[206]["protection"] = 1
    configs[206]["memory"] = 256
    configs[208] = {"name": "vm", "cores": 2, "sockets": 1, "memory": "2048", "onboot": 1,
                    "tags": "labkeeper", "net0": "virtio=BC:24:11:00:00:02,bridge=vmbr0",
                    "scsi0": "local-lvm:vm-208-disk-0,size=8G"}
    actual = pv.Actual(guests=guests, configs=configs,
                       templates={("pve1", "local"): [TEMPLATE]})
    plan = pv.make_plan(inv, actual)
    action = {g.name: g.action for g in plan.guests}
    assert action == {"new": "create", "same": "leave", "bigger": "change",
                      "smaller": "change", "stopped": "change", "gone": "destroy",
                      "locked-down": "protected", "squatted": "conflict", "vm": "change",
                      "foreign": "unmanaged", "tmpl": "unmanaged"}
    assert [c.text() for c in plan.guest("bigger").changes] == [
        "cores: 2 → 4", "rootfs: 8G → 16G (grow)"]
    assert plan.guest("smaller").changes[-1].kind == "refused"
    assert plan.guest("stopped").summary() == "start (stopped → running)"
    vm = plan.guest("vm")
    assert vm.needs_restart
    assert {c.key for c in vm.changes if c.needs_restart} == {"cores", "memory"}
    assert plan.problems == [
        "smaller (203): rootfs: disks never shrink",
        "squatted (207): vmid 207 is held by lxc 'theirs' on pve1 without the 'labkeeper' "
        "tag: labkeeper does not touch it (give the inventory guest another vmid, or tag "
        "that guest to adopt it)"]
    assert len(plan.touched) == 6 and plan.needs_yes
    data = json.loads(plan.to_json())
    assert data["needs_restart"] == ["vm"]
    assert data["counts"]["unmanaged"] == 2
    table = plan.table()
    assert "memory: 2048 → 4096 [restart]" in table
    md = plan.markdown()
    assert "## Problems" in md and "needs `--yes`" in md


def test_missing_template_and_missing_qemu_template_are_plan_problems():
    inv = inventory([lxc("a", 200, template="local:vztmpl/nope.tar.zst"),
                     {"name": "vm", "vmid": 201, "type": "qemu", "node": "pve1",
                      "template": "9001", "resources": {"storage": "local-lvm"}}])
    actual = pv.Actual(guests={9000: pve_guest(9000, "qemu", name="tmpl", template=True)},
                       templates={("pve1", "local"): [TEMPLATE]})
    plan = pv.make_plan(inv, actual)
    assert plan.problems[0].startswith("a (200): template local:vztmpl/nope.tar.zst not found "
                                       "in storage 'local' on pve1; templates there: " + TEMPLATE)
    assert plan.problems[1] == ("vm (201): template vmid 9001 does not exist; QEMU templates: "
                                "9000 (tmpl)")


def test_steps_follow_the_plan_and_guests_follow_dependencies():
    inv = inventory([lxc("app", 201, depends_on=["db"], protection=True),
                     lxc("db", 200, ssh={"address": "10.0.0.5", "key": "env:K"})])
    assert [g.name for g in pv.guest_order(inv.guests)] == ["db", "app"]
    create = pv.GuestPlan("db", 200, "lxc", "pve1", "create")
    assert pv.steps_for(create, inv.guest("db"), pv.ApplyOptions()) == [
        "create", "configure", "start", "wait-ssh"]
    start_only = pv.GuestPlan("app", 201, "lxc", "pve1", "change",
                              changes=(pv.Change("status", "stopped", "running", kind="start"),))
    assert pv.steps_for(start_only, inv.guest("app"), pv.ApplyOptions()) == ["start", "protect"]
    destroy = pv.GuestPlan("db", 200, "lxc", "pve1", "destroy")
    assert pv.steps_for(destroy, inv.guest("db"), pv.ApplyOptions()) == []
    assert pv.steps_for(destroy, inv.guest("db"), pv.ApplyOptions(allow_destroy=True)) == [
        "destroy"]


def test_sizes_and_props_parse():
    assert pv.disk_size("local-lvm:vm-1-disk-0,size=8G") == ("local-lvm", 8 * pv.GiB)
    assert pv.disk_size("volume=local:1/vm-1-disk-0.raw,size=512M") == ("local", 512 * 1024**2)
    assert pv.parse_props("virtio=AA,bridge=vmbr0") == {"virtio": "AA", "bridge": "vmbr0"}
    assert pv.format_props({"virtio": "", "bridge": "vmbr0"}) == "virtio,bridge=vmbr0"
    assert px.resize_request("pve1", 100, "lxc", "rootfs", "16G").path == \
        "/nodes/pve1/lxc/100/resize"
