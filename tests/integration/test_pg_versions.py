"""The PostgreSQL client matching the server (issue 23 item 2), against a real
PostgreSQL 17 server (in a container on the real engine, reached over TCP on
loopback) from this Debian 12 host whose own client is 15.

The client root is ``LABKEEPER_PG_BIN_ROOT``: ``only15`` holds the host's client 15;
``with17`` adds a 17 that runs Debian 13's client from the cached root filesystem
under chroot (see tests/fixtures/pg17.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from labkeeper import doctor, drill, pg_backup, pg_client, restic
from labkeeper.inventory import load_inventory
from tests.fixtures.procs import process_argvs

NAME = "pg17app"


@pytest.fixture(scope="module")
def pg17_inventory(lab, pg17, tmp_path_factory) -> Path:
    """The lab's inventory plus ``pg17app`` (appdb on the PostgreSQL 17 server, over
    TCP, password auth) drilled on that same server."""
    inv = yaml.safe_load(lab.inventory_path.read_text())
    pw = f"file:{pg17.password_file}"
    inv["databases"].append({
        "name": NAME, "host": "127.0.0.1", "port": pg17.port, "dbname": "appdb",
        "user": pg17.app_user, "password": pw, "repository": "lab-repo",
        "drill": {"enabled": True, "server": "pg17", "rpo_hours": 26, "rto_minutes": 30,
                  "smoke_queries": [{"sql": "SELECT count(*) FROM users", "equals": 500}]}})
    inv["drills"]["servers"].append({"name": "pg17", "host": "127.0.0.1", "port": pg17.port,
                                     "user": pg17.app_user, "password": pw})
    path = tmp_path_factory.mktemp("pg17inv") / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _series(inv, name: str) -> list[restic.Snapshot]:
    repo = pg_backup.open_repo(inv, "lab-repo")
    return restic.find_snapshots(repo, tags=["labkeeper", f"db:127.0.0.1/{name}"],
                                 host=inv.lab.name)


def test_server_newer_than_every_client_fails_before_any_restic_run_naming_the_package(
        pg17_inventory, pg_bin_roots, monkeypatch):
    monkeypatch.setenv(pg_client.BIN_ROOT_ENV, str(pg_bin_roots.only15))
    inv = load_inventory(pg17_inventory)
    before = _series(inv, NAME)
    seen_restic: list[list[bytes]] = []

    class Probe(logging.Handler):  # each record of the run: no restic may be running
        def emit(self, record: logging.LogRecord) -> None:
            seen_restic.extend(a for _, a in process_argvs()
                               if a[0].endswith(b"restic") and b"--stdin" in a)

    probe = Probe()
    logging.getLogger("labkeeper").addHandler(probe)
    try:
        with pytest.raises(pg_backup.BackupFailed) as info:
            pg_backup.backup_database(inv, NAME)
    finally:
        logging.getLogger("labkeeper").removeHandler(probe)
    msg = str(info.value)
    assert "postgresql-client-17" in msg, msg
    assert f"127.0.0.1:{load_inventory(pg17_inventory).database(NAME).port}" in msg
    assert "before dumping" in msg and not info.value.transient
    assert not seen_restic
    assert _series(inv, NAME) == before  # no snapshot of any kind was made


def test_doctor_says_which_client_package_is_missing_for_a_newer_server(
        pg17_inventory, pg_bin_roots, monkeypatch):
    monkeypatch.setenv(pg_client.BIN_ROOT_ENV, str(pg_bin_roots.only15))
    inv = load_inventory(pg17_inventory)
    with pytest.raises(pg_client.ClientMissing) as info:
        doctor.check_database(inv, NAME)
    assert info.value.package == "postgresql-client-17" and info.value.server_major == 17


def test_server_15_keeps_using_client_15_when_17_is_installed_too(
        pg17_inventory, pg_bin_roots, monkeypatch):
    monkeypatch.setenv(pg_client.BIN_ROOT_ENV, str(pg_bin_roots.with17))
    inv = load_inventory(pg17_inventory)
    conn = pg_backup.client_conn(inv, inv.database("appdb"))
    assert conn.client.server_major == 15 and conn.client.bindir.endswith("/15/bin")


def test_server_17_with_client_17_installed_backs_up_and_its_drill_verifies_the_manifest(
        pg17_inventory, pg_bin_roots, monkeypatch):
    monkeypatch.setenv(pg_client.BIN_ROOT_ENV, str(pg_bin_roots.with17))
    inv = load_inventory(pg17_inventory)
    detail = doctor.check_database(inv, NAME).detail
    assert "PostgreSQL 17." in detail and "/17/bin" in detail, detail
    result = pg_backup.backup_database(inv, NAME)
    label = pg_backup.server_label(inv, inv.database(NAME))
    glob = pg_backup.backup_globals(inv, label, [NAME])
    assert glob.snapshot_id, glob.detail  # pg_dumpall 17 (without role passwords: not superuser)
    assert result.total_rows == 500 + 1200 + 8000 + 20000
    repo = pg_backup.open_repo(inv, "lab-repo")
    stored = pg_backup.find_latest_backup(repo, lab=inv.lab.name, server="127.0.0.1", name=NAME)
    assert stored is not None and stored.backup_id == result.backup_id
    manifest = pg_backup.read_manifest(repo, stored)
    assert manifest.pg_dump_version.startswith("17.") and manifest.server_version.startswith("17.")
    drilled = drill.database_drill(inv, NAME)
    assert drilled.passed, drilled.summary()
    tables = [c for c in drilled.checks if c.name.startswith("table ")]
    assert len(tables) == 4 and all(c.ok for c in tables)


def test_dump_of_server_17_is_not_restored_into_a_server_15_drill_target(
        pg17_inventory, pg_bin_roots, monkeypatch, tmp_path):
    monkeypatch.setenv(pg_client.BIN_ROOT_ENV, str(pg_bin_roots.with17))
    data = yaml.safe_load(pg17_inventory.read_text())
    for db in data["databases"]:
        if db["name"] == NAME:
            db["drill"]["server"] = "lab-pg"  # the host's PostgreSQL 15
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    inv = load_inventory(path)
    repo = pg_backup.open_repo(inv, "lab-repo")
    if pg_backup.find_latest_backup(repo, lab=inv.lab.name, server="127.0.0.1",
                                    name=NAME) is None:
        pg_backup.backup_database(inv, NAME)
    drilled = drill.database_drill(inv, NAME)
    assert not drilled.passed
    assert "PostgreSQL 17" in drilled.summary() and "PostgreSQL 15" in drilled.summary()
    assert drilled.scratch == ""  # refused before creating the scratch database


def test_without_versioned_client_dirs_the_client_on_path_is_used_only_when_new_enough(
        pg17_inventory, monkeypatch, tmp_path):
    monkeypatch.setenv(pg_client.BIN_ROOT_ENV, str(tmp_path))  # no <major>/bin under it
    inv = load_inventory(pg17_inventory)
    conn = pg_backup.client_conn(inv, inv.database("appdb"))  # the host's 15 server
    assert conn.client.bindir is None and conn.client.server_major == 15
    with pytest.raises(pg_backup.BackupFailed, match="postgresql-client-17"):
        pg_backup.client_conn(inv, inv.database(NAME))
