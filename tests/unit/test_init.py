"""labkeeper init's pure parts: YAML with comments, guest descriptions, calendar → cron,
the database-only inventory, and the pveum commands the admin guide shows."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from cronsim import CronSim

from labkeeper import init as lk
from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.inventory import Guest, parse_inventory, validate_text
from labkeeper.pvesim.calendar import parse_calendar_event
from tests.recorded import PVE

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "ADMIN_GUIDE.md"


@pytest.mark.parametrize("text", ["on", "yes", "no", "22:00", "0", "1e3", "null", "~", "",
                                  " x", "a: b", "#c", "x #y", "local:vztmpl/d.tar.zst",
                                  "line1\nline2", "naïve", "it's", '"q"', "[1]", "{a}",
                                  "-", "- x", "? x", "@x", "%x", "`x", "!x", "&x", "*x"])
def test_every_string_scalar_reads_back_as_the_same_string(text: str):
    assert yaml.safe_load(f"k: {lk.scalar(text)}") == {"k": text}


def test_comments_and_nested_lists_emit_valid_yaml():
    doc = {"a": lk.Note(1, "one", above=("top",)),
           "items": [lk.Note({"name": "x", "list": [1, 2]}, above=("first",)),
                     {"name": "y", "sub": {"k": lk.Note("v", "c")}}],
           "empty": lk.Note([], above=("nothing",))}
    text = "\n".join(lk.emit(doc))
    assert yaml.safe_load(text) == {"a": 1, "items": [{"name": "x", "list": [1, 2]},
                                                      {"name": "y", "sub": {"k": "v"}}],
                                    "empty": []}
    assert "# top" in text and "a: 1  # one" in text and "# first" in text


def _facts(vmid: int, config: dict, *, gtype: str = "lxc", status: str = "running",
           tags: str = "") -> lk.GuestFacts:
    res = px.Guest.model_validate({"vmid": vmid, "type": gtype, "node": "pve1",
                                   "status": status, "tags": tags or config.get("tags"),
                                   "name": config.get("hostname") or config.get("name", "")})
    return lk.GuestFacts(res, config)


def test_the_recorded_lxc_config_is_described_exactly():
    config = json.loads((PVE / "lxc-config-pve6.2-anonymised.cpx.json").read_text())
    config["net0"] = config["net0"].replace("FF:FF:FF:FF:FF:FF", "BC:24:11:00:00:01")
    d = lk.describe_guest(_facts(100, config), managed_tag="labkeeper",
                          template="local:vztmpl/ubuntu-22.04.tar.zst", fallback_storage=None)
    assert d.reasons == ()
    guest = Guest.model_validate(d.data)
    assert guest.tags == ["one", "two", "three"]
    assert (guest.resources.cores, guest.resources.memory_mb, guest.resources.swap_mb,
            guest.resources.disk_gb, guest.resources.storage) == (1, 1000, 0, 4, "local-lvm")
    assert guest.network[0].ip == "10.1.1.3/24" and guest.network[0].gateway == "10.1.1.1"
    tagged = {**config, "tags": "one;two;three;labkeeper"}
    assert pv.config_changes(guest, "labkeeper", tagged, running=True) == []


@pytest.mark.parametrize(("gtype", "extra", "reason"), [
    ("qemu", {"hostpci0": "0000:01:00.0,pcie=1"}, "hostpci0=0000:01:00.0"),
    ("qemu", {"scsi1": "local-lvm:vm-100-disk-1,size=32G"}, "scsi1="),
    ("qemu", {"usb0": "host=1-1"}, "usb0=host=1-1"),
    ("lxc", {"mp0": "local-lvm:vm-100-disk-1,mp=/data,size=8G"}, "mp0="),
    ("lxc", {"dev0": "/dev/dri/renderD128"}, "dev0="),
    ("lxc", {"startup": "order=1,up=30"}, "only order=N is modelled"),
    ("lxc", {"net0": "name=eth0,bridge=vmbr0,rate=10"}, "NIC option rate"),
    ("lxc", {"features": "nesting=1,mknod=1"}, "LXC feature mknod"),
    ("lxc", {"rootfs": "local-lvm:vm-100-disk-0,size=1536M"}, "not a whole number of GiB"),
    ("lxc", {"hostname": "Web Server"}, "is not a hostname label"),
])
def test_a_config_the_model_lacks_is_unmanaged_with_the_reason(gtype: str, extra: dict,
                                                               reason: str):
    base = {"cores": 1, "memory": 512}
    base.update({"hostname": "web", "rootfs": "local-lvm:vm-100-disk-0,size=8G"}
                if gtype == "lxc" else
                {"name": "web", "scsi0": "local-lvm:vm-100-disk-0,size=8G"})
    d = lk.describe_guest(_facts(100, {**base, **extra}, gtype=gtype), managed_tag="labkeeper",
                          template=None, fallback_storage="local-lvm")
    assert not d.managed
    assert any(reason in r for r in d.reasons), d.reasons
    Guest.model_validate({**d.data, "managed": False})


def test_a_secret_value_given_for_a_reference_is_refused_without_echoing_it():
    with pytest.raises(lk.InitError) as exc:
        lk.check_ref("--token-secret", "d41cf783-c761-49f9-ab2e-911fb112070a")
    assert "d41cf783" not in str(exc.value) and "reference" in str(exc.value)


CALENDAR_EVENTS = ["06,18:30", "sat 15:00", "mon..fri 02:30", "daily", "hourly", "weekly",
                   "*/15", "sun 01:00", "mon,wed,fri 23:45", "2..5:00", "*:0/20",
                   "sat..mon 04:10", "21:00", "monthly"]


@pytest.mark.parametrize("event", CALENDAR_EVENTS)
def test_a_pve_calendar_event_becomes_a_cron_that_fires_at_the_same_times(event: str):
    cron = lk.calendar_to_cron(event)
    assert cron is not None
    parsed = parse_calendar_event(event)
    at = datetime(2026, 3, 1, 12, 7, tzinfo=UTC)
    crons = CronSim(cron, at)
    when = at
    for _ in range(30):
        nxt = parsed.next_after(when, UTC)
        assert nxt == next(crons), (event, cron)
        when = nxt


@pytest.mark.parametrize("event", ["*-*-01 02:00", "sat 02:00:30", "2026-01-01 00:00"])
def test_a_calendar_event_without_a_cron_equivalent_is_none(event: str):
    assert lk.calendar_to_cron(event) is None


def test_the_database_only_inventory_validates_and_says_what_to_decide():
    text = lk.render_inventory(lk.InitOptions(lab_name="home"))
    assert validate_text(text) == []
    inv = parse_inventory(text)
    assert inv.proxmox is None and inv.guests == []
    assert [d.repository for d in inv.databases] == ["main"]
    assert inv.databases[0].password == "file:/etc/labkeeper/pg-password"
    assert text.count("TODO") >= 3


def test_databases_with_odd_names_keep_their_real_name_as_dbname():
    pg = lk.PgServer("10.0.0.5", 5433, "backup", "env:PGPASS")
    text = lk.render_inventory(lk.InitOptions(postgres=pg), None, ["Nextcloud", "n8n"])
    inv = parse_inventory(text)
    assert [(d.name, d.effective_dbname, d.port) for d in inv.databases] == [
        ("nextcloud", "Nextcloud", 5433), ("n8n", "n8n", 5433)]


def test_the_admin_guide_shows_the_pveum_commands_labkeeper_proxmox_token_prints():
    text = GUIDE.read_text(encoding="utf-8")
    block = re.search(r"On a PVE node, as root:\s*```sh\n(.*?)```", text, re.S)
    assert block, "the admin guide lost its pveum block"
    assert block.group(1).strip().splitlines() == lk.token_commands()


def test_a_storage_seen_on_some_nodes_lists_them():
    facts = lk.storages_of([
        {"type": "storage", "storage": "nas", "node": "pve1", "content": "backup",
         "plugintype": "nfs", "shared": 1},
        {"type": "storage", "storage": "nas", "node": "pve2", "content": "backup,iso",
         "plugintype": "nfs", "shared": 1},
    ])
    assert facts == (lk.StorageFacts("nas", "nfs", ("backup", "iso"), ("pve1", "pve2"), True),)


def test_jobs_with_a_missing_storage_are_left_as_comments():
    note = lk.describe_job({"id": "j1", "storage": "pbs1", "vmid": "100", "schedule": "01:00"},
                           name="j1", vmids={100}, backup_storages={"local"})
    assert note.value is None
    assert any("not imported" in line for line in note.above)


def _cluster_facts(job: dict) -> lk.ClusterFacts:
    res = px.Guest.model_validate({"vmid": 100, "type": "lxc", "node": "pve1",
                                   "status": "running", "name": "web"})
    config = {"hostname": "web", "cores": 1, "memory": 512,
              "rootfs": "local-lvm:vm-100-disk-0,size=8G"}
    storages = (lk.StorageFacts("local-lvm", "lvmthin", ("images", "rootdir"), ("pve1", "pve2")),
                lk.StorageFacts("nas", "nfs", ("backup",), ("pve1",)))
    return lk.ClusterFacts(("pve1", "pve2"), (lk.GuestFacts(res, config),), storages, {},
                           (job,))


def test_a_job_the_inventory_refuses_is_written_as_a_comment_saying_why():
    job = {"id": "nas-pve2", "type": "vzdump", "storage": "nas", "node": "pve2", "all": 1,
           "schedule": "02:00"}
    opts = lk.InitOptions(proxmox_host="pve1", token_id="a@pve!b", token_secret="env:PVE")
    facts = _cluster_facts(job)
    assert validate_text(lk.render_inventory(opts, facts))  # refused as it stands
    text = lk.render_valid(opts, facts)
    assert validate_text(text) == []
    assert "not imported: vzdump_jobs[0].storage: storage 'nas' is not available" in text
    assert parse_inventory(text).vzdump_jobs == []


def test_a_fingerprint_without_colons_is_written_as_the_inventory_wants_it():
    from cli.init import build_options

    opts = build_options(proxmox="https://pve1:8006", token_id="a@pve!b",
                         token_secret="env:PVE", fingerprint="ab" * 32, ca_file=None,
                         postgres=None, pg_user="postgres", pg_password=None, name=None)
    assert opts.fingerprint == ":".join(["AB"] * 32)
    assert (opts.proxmox_host, opts.proxmox_port, opts.lab_name) == ("pve1", 8006, "pve1")
