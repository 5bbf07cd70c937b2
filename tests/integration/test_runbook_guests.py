"""The guest runbooks end to end: add-new-service, restore-guest (new VMID and over the
original), rollback-app, pre-maintenance and post-maintenance, against a simulator of
this module's own (so the session lab's stays untouched), the lab's sshd, PostgreSQL
and restic repository, and an app served by ``python3 -m http.server`` from the
guest's simulated root filesystem."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows.runbook import runbook_flow
from labkeeper import proxmox as px
from labkeeper import update
from labkeeper.inventory import load_inventory
from labkeeper.locallab.lab import PVE_NODES, PVE_TOKEN_ID, write_secret
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import Service
from labkeeper.pvesim import Simulator

pytestmark = pytest.mark.integration

DB = "rbguest"
APP_VMID = 120


@pytest.fixture(scope="module")
def glab(lab, tmp_path_factory, prefect_harness):
    """(inventory path, simulator, app rootfs) with demo guests provisioned by
    add-new-service (the fixture keeps its state for the test that checks it)."""
    work = tmp_path_factory.mktemp("rbg")
    token = secrets.token_hex(12)
    sim = Simulator(nodes=PVE_NODES, state_path=work / "pvesim.json", task_duration=0.02,
                    tokens={PVE_TOKEN_ID: token}, host_paths=True)
    sim.start(host="127.0.0.1", port=0)
    port = free_port()
    root = work / "rootfs-web-good"
    www = root / "www"
    www.mkdir(parents=True)
    (www / "VERSION").write_text("1.0")
    (www / "health").write_text("ok")
    web = Service("rb-web-good", (sys.executable, "-m", "http.server", str(port), "--bind",
                                  "127.0.0.1", "--directory", str(www)),
                  log_path=work / "web.log")
    pg = lab.postgres
    try:
        web.start()
        wait_for_port("127.0.0.1", port, timeout=15)
        pg.psql_super(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE);")
        pg.psql_super(f"CREATE DATABASE {DB} OWNER {pg.app_user};")
        pg.psql_super(f"SET ROLE {pg.app_user};\nCREATE TABLE t (id int);\n"
                      "INSERT INTO t SELECT generate_series(1, 10);", db=DB)
        inv = yaml.safe_load(lab.inventory_path.read_text())
        inv["proxmox"].update({
            "host": sim.host, "port": sim.port,
            "token_secret": f"file:{write_secret(work / 'pve-token', token)}",
            "tls": {"verify": True, "ca_file": str(sim.ca_file), "fingerprint": sim.fingerprint}})
        guests = {g["name"]: g for g in inv["guests"]}
        guests["app"]["depends_on"] = ["proxy"]
        good = next(a for a in inv["apps"] if a["name"] == "good")
        good["health"][0]["http"]["url"] = f"http://127.0.0.1:{port}/health"
        good["gate"] = {"initial_delay": 0, "interval": 0.2, "deadline": 5, "successes": 2}
        inv["apps"] = [good]
        base = next(d for d in inv["databases"] if d["name"] == "appdb")
        inv["databases"] = [{**base, "name": DB, "dbname": DB,
                             "drill": {**base["drill"], "smoke_queries": []}}]
        inv["settings"]["state_dir"] = str(work / "state")
        path = work / "lab.yaml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        state = runbook_flow(name="add-new-service", params={"guest": "proxy", "job": "demo"},
                             yes=True, lab=str(path), return_state=True)
        sim.set_rootfs_dir(APP_VMID, root)
        yield {"path": path, "sim": sim, "www": www, "add_state": state}
    finally:
        web.stop()
        sim.stop()
        pg.psql_super(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE);")


def api(glab: dict[str, Any]) -> Any:
    return px.connect(load_inventory(glab["path"]).proxmox)


def status_of(glab: dict[str, Any], vmid: int) -> str:
    found = px.find_guest(api(glab), vmid)
    return found.status if found is not None else "absent"


def run(glab: dict[str, Any], name: str, **params: Any) -> Any:
    return runbook_flow(name=name, params=params, yes=True, lab=str(glab["path"]),
                        return_state=True)


def steps(state: Any) -> dict[str, dict[str, Any]]:
    return {r["step"]: r for r in state.result()}


def test_add_new_service_provisions_tags_and_takes_the_first_backups(glab):
    state = glab["add_state"]
    assert state.is_completed(), state.message
    s = steps(state)
    assert s["provision"]["status"] == "ok" and s["first-vzdump"]["status"] == "ok"
    assert s["first-db-backup"]["status"] == "skipped"  # proxy runs no database
    assert s["deploy"]["status"] == "skipped"  # and no app
    assert s["into-job"]["status"] == "ok" and "demo" in s["into-job"]["detail"]
    a = api(glab)
    assert status_of(glab, 100) == "running"
    assert "demo" in px.find_guest(a, 100).tags
    archives = px.backups(a, "pve1", "local", vmid=100)
    assert len(archives) == 1


def test_restore_guest_to_a_new_vmid_is_stopped_unplugged_without_host_mounts_or_devices(
        glab):
    # production's guest has a bind mount and a passed-through device, archived with it
    a = api(glab)
    px.configure(a, "pve1", 100, "lxc", {"mp0": "/srv/proxy-shared,mp=/shared",
                                         "dev0": "/dev/ttyUSB0"})
    px.wait_for_task(a, px.vzdump(a, "pve1", vmids=[100], storage="local"), timeout=30,
                     poll=0.05)
    state = run(glab, "restore-guest", guest="proxy", vmid=150)
    assert state.is_completed(), state.message
    s = steps(state)
    assert s["restore-new"]["status"] == "ok"
    assert s["restore-over"]["status"] == "skipped"
    assert status_of(glab, 150) == "stopped" and status_of(glab, 100) == "running"
    copy = px.guest_config(a, "pve1", 150, "lxc").values
    nics = [k for k in copy if k.startswith("net")]
    assert nics and all("link_down=1" in copy[k] for k in nics), copy
    assert str(copy["onboot"]) == "0"
    assert "mp0" not in copy and "dev0" not in copy, copy
    original = px.guest_config(a, "pve1", 100, "lxc").values
    assert original["mp0"].startswith("/srv/proxy-shared") and "dev0" in original
    assert all("link_down" not in original[k] for k in nics)


def test_restore_guest_over_the_original_after_approval(glab):
    a = api(glab)
    vol = px.backups(a, "pve1", "local", vmid=100)[-1].volid
    state = run(glab, "restore-guest", guest="proxy", archive=vol, over_original="true")
    assert state.is_completed(), state.message
    s = steps(state)
    assert s["restore-new"]["status"] == "skipped"
    assert s["approve-over"]["status"] == "ok" and s["restore-over"]["status"] == "ok"
    assert s["running"]["status"] == "ok"


def test_rollback_app_returns_to_the_pre_update_snapshot_and_proves_health(glab):
    www: Path = glab["www"]
    a = api(glab)
    snap = update.snapshot_name("good", update.new_run_id())
    px.wait_for_task(a, px.create_snapshot(a, "pve1", APP_VMID, "lxc", snap), timeout=30)
    (www / "VERSION").write_text("2.0")
    (www / "health").write_text("fail")  # a broken update
    state = run(glab, "rollback-app", app="good")
    assert state.is_completed(), state.message
    s = steps(state)
    assert snap in s["rollback"]["detail"] and s["healthy"]["status"] == "ok"
    assert (www / "VERSION").read_text() == "1.0"


def test_rollback_app_without_a_pre_update_snapshot_fails_in_dry_run_naming_it(glab):
    a = api(glab)
    for snap in px.list_snapshots(a, "pve1", APP_VMID, "lxc"):
        if update.is_pre_update(snap.name):
            px.wait_for_task(a, px.delete_snapshot(a, "pve1", APP_VMID, "lxc", snap.name),
                             timeout=30)
    state = runbook_flow(name="rollback-app", params={"app": "good"}, dry_run=True,
                         lab=str(glab["path"]), return_state=True)
    assert state.is_failed()
    assert "has no pre-update snapshot" in state.message


def test_pre_maintenance_backs_up_then_stops_dependents_first(glab):
    state = run(glab, "pre-maintenance", guests="proxy,app")
    assert state.is_completed(), state.message
    s = steps(state)
    assert s["databases"]["status"] == "ok" and s["files"]["status"] == "ok"
    assert "app stopped; proxy stopped" in s["stop"]["detail"]  # app depends on proxy
    assert status_of(glab, 100) == "stopped" and status_of(glab, 101) == "stopped"


def test_post_maintenance_starts_dependencies_first_and_runs_every_probe(glab):
    state = run(glab, "post-maintenance", guests="app,proxy")
    assert state.is_completed(), state.message
    s = steps(state)
    assert "proxy running; app running" in s["start"]["detail"]
    assert s["running"]["status"] == "ok"
    assert "good healthy" in s["healthy"]["detail"]
    assert status_of(glab, 100) == "running" and status_of(glab, 101) == "running"


def test_every_shipped_runbook_dry_runs_against_the_lab_without_changes(glab):
    a = api(glab)
    before = sorted((g.vmid, g.status) for g in px.list_guests(a))
    cases = {"restore-guest": {"guest": "proxy"}, "add-new-service": {"guest": "app",
                                                                     "job": "demo"},
             "pre-maintenance": {"guests": "proxy,app"},
             "post-maintenance": {"guests": "proxy,app"},
             "restore-database": {"database": DB}}
    for name, params in cases.items():
        state = runbook_flow(name=name, params=params, dry_run=True, lab=str(glab["path"]),
                             return_state=True)
        assert state.is_completed(), (name, state.message)
        assert {r["status"] for r in state.result()} <= {"planned", "skipped"}, name
    assert sorted((g.vmid, g.status) for g in px.list_guests(a)) == before
