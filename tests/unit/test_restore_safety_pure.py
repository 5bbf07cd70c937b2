"""Pure parts of the data-loss fixes for backups and restores: which snapshot a restore
picks, which databases swap/drop accept, what a guest copy loses before it may run,
which dumps count as backups, and the pending-cleanup file of a database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from labkeeper import pending, pg_backup, restore
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError
from labkeeper.restic import Snapshot

NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
A = "a1b2c3d4" + "0" * 56
A2 = "a1b2c3d4" + "f" * 56  # shares 8 digits with A
B = "b" * 64


def _snap(sid: str, kind: str, bid: str, when: datetime = NOW) -> Snapshot:
    return Snapshot(id=sid, short_id=sid[:8], time=when,
                    tags=["labkeeper", "db:pg1/app", f"kind:{kind}", f"backup:{bid}"])


def _backup(dump_id: str, manifest_id: str, bid: str) -> pg_backup.StoredBackup:
    return pg_backup.StoredBackup(dump=_snap(dump_id, "pg_dump", bid),
                                  manifest=_snap(manifest_id, "pg_manifest", bid), backup_id=bid)


OLDEST = _backup(A, "c" * 64, "b-old")
NEWEST = _backup(B, "d" * 64, "b-new")


# -- which backup a restore picks ---------------------------------------------------------

@pytest.mark.parametrize("ref", ["", "a", "a1b2c3d", "A1B2C3D4", "a1b2c3d4 ", "latest!",
                                 "g1b2c3d4"])
def test_empty_short_or_non_hex_snapshot_prefix_is_refused_naming_the_field(ref):
    with pytest.raises(ConfigError, match=r"^snapshot: .* at least 8 lowercase hex digits"):
        restore.match_backup([OLDEST, NEWEST], ref, series="db:pg1/app")


def test_latest_is_the_newest_and_an_eight_digit_prefix_names_exactly_one_backup():
    assert restore.match_backup([OLDEST, NEWEST], "latest", series="s") is NEWEST
    assert restore.match_backup([OLDEST, NEWEST], "bbbbbbbb", series="s") is NEWEST
    assert restore.match_backup([OLDEST, NEWEST], "dddddddd", series="s") is NEWEST  # manifest
    assert restore.match_backup([OLDEST, NEWEST], A, series="s") is OLDEST  # the full id


def test_a_prefix_matching_two_backups_is_refused_instead_of_restoring_the_first():
    twin = _backup(A2, "e" * 64, "b-twin")
    with pytest.raises(ConfigError, match=r"snapshot: 'a1b2c3d4' matches 2 backups"):
        restore.match_backup([OLDEST, twin, NEWEST], "a1b2c3d4", series="s")
    assert restore.match_backup([OLDEST, twin], "a1b2c3d4f", series="s") is twin


def test_an_unknown_prefix_is_not_a_complete_backup():
    with pytest.raises(restore.RestoreFailed, match="is not a complete backup of s"):
        restore.match_backup([OLDEST, NEWEST], "12345678", series="s")


# -- swap and drop accept only what this run made -----------------------------------------

def test_swap_and_drop_accept_only_databases_this_run_made_for_that_database():
    made = {"app": ["app_restored_20261205030000"]}
    restore.made_by_run(made, "app", "app_restored_20261205030000", field_name="restored")
    for name, target in (("app", "app_restored_20200101000000"),  # another run's copy
                         ("other", "app_restored_20261205030000")):  # not for this database
        with pytest.raises(ConfigError, match=r"^name: .* was not created for database"):
            restore.made_by_run(made, name, target, field_name="name")


# -- what a restored guest copy loses --------------------------------------------------------

def test_bind_and_device_mounts_and_passthrough_devices_are_stripped_volumes_kept():
    config = {
        "rootfs": "local-lvm:vm-150-disk-0,size=8G",
        "mp0": "/srv/photos,mp=/photos",  # bind mount
        "mp1": "local-lvm:vm-150-disk-1,mp=/data,size=4G",  # a volume of its own
        "mp2": "volume=/dev/sdb1,mp=/mnt/disk",  # device mount
        "dev0": "/dev/ttyUSB0,mode=0660",
        "hostpci0": "0000:01:00.0,pcie=1",
        "usb0": "host=1234:5678", "usb1": "spice", "usb2": "host=spice",
        "scsi0": "local-lvm:vm-150-disk-2,size=32G", "scsi1": "/dev/disk/by-id/ata-X",
        "serial0": "socket", "serial1": "/dev/ttyS1", "parallel0": "/dev/parport0",
        "net0": "name=eth0,bridge=vmbr0,ip=10.0.0.5/24",
    }
    assert px.host_bound_keys(config) == ["dev0", "hostpci0", "mp0", "mp2", "parallel0",
                                          "scsi1", "serial1", "usb0"]


def test_every_nic_of_a_copy_is_unplugged_with_its_settings_kept():
    config = {"net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=10.0.0.5/24",
              "net1": "virtio=BC:24:11:00:00:02,bridge=vmbr1,link_down=0", "netmask": "x",
              "hostname": "web"}
    assert px.unplugged_nics(config) == {
        "net0": "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=10.0.0.5/24,link_down=1",
        "net1": "virtio=BC:24:11:00:00:02,bridge=vmbr1,link_down=1"}


def test_a_qemu_restore_request_carries_extra_options_over_the_archived_config():
    req = px.restore_qemu_request("pve1", 150, "local:backup/vzdump-qemu-100.vma.zst",
                                  unique=True, options={"onboot": 0})
    assert req.params["onboot"] == 0 and req.params["archive"].endswith(".vma.zst")


# -- which dumps are backups --------------------------------------------------------------

def test_a_dump_counts_only_with_its_manifest():
    done = [_snap(A, "pg_dump", "ok1"), _snap("c" * 64, "pg_manifest", "ok1")]
    leftover = _snap(B, "pg_dump", "failed1")
    assert pg_backup.complete_dumps([*done, leftover]) == [done[0]]


def test_manifestless_dumps_are_leftovers_when_recorded_failed_or_older_than_the_grace():
    old = _snap("1" * 64, "pg_dump", "old", NOW - timedelta(hours=3))
    recorded = _snap("2" * 64, "pg_dump", "rec", NOW - timedelta(minutes=1))
    young = _snap("3" * 64, "pg_dump", "young", NOW - timedelta(minutes=1))
    complete = [_snap("4" * 64, "pg_dump", "ok", NOW - timedelta(days=3)),
                _snap("5" * 64, "pg_manifest", "ok", NOW - timedelta(days=3))]
    leftovers, in_flight = pg_backup.incomplete_dumps(
        [old, recorded, young, *complete], now=NOW, grace_s=3600, failed={"rec"})
    assert leftovers == [old, recorded] and in_flight == [young]


# -- a database's pending-cleanup file (the shared labkeeper.pending) ----------------------

def test_a_database_pending_file_is_its_own_and_round_trips(tmp_path: Path):
    owner = pg_backup.pending_owner("appdb", "db:127.0.0.1/appdb")
    assert pending.pending_path(Path("/s"), owner) == Path("/s/pg_backup/pending-appdb.json")
    store = pending.PendingStore(tmp_path, owner)
    attempt = pending.new_pending("20261205T020000Z-abcdef", snapshot_host="home",
                                  reason="forget: repository is already locked", now=NOW)
    store.add(attempt)
    data = json.loads(store.path.read_text())
    assert data["database"] == "appdb" and data["series"] == "db:127.0.0.1/appdb"
    assert store.read() == [attempt]
    other = pending.PendingStore(tmp_path, pg_backup.pending_owner("photos", "db:x/photos"))
    other.path.parent.mkdir(parents=True, exist_ok=True)
    other.path.write_text(store.path.read_text())  # copied by hand: refused, not read empty
    with pytest.raises(pg_backup.LabkeeperError, match="belongs to appdb, not photos"):
        other.read()
    assert pg_backup.record_pending(store, "20261205T030000Z-123456", host="home",
                                    reason="x").startswith("recorded attempt")
    assert [a.backup_id for a in store.read()] == ["20261205T020000Z-abcdef",
                                                    "20261205T030000Z-123456"]
