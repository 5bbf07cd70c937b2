"""The update flow end to end with the ``commands`` strategy, against real parts.

- Proxmox: a fresh simulator per test; the app's LXC has a real directory as its
  rootfs (snapshots copy it, rollback restores it, vzdump archives it, restore
  recreates it);
- the guest: the local sshd (update commands and version commands run over SSH);
- the app: ``python3 -m http.server`` on a free loopback port serving ``www/`` of
  that rootfs directory (started here, stopped by PID);
- Prefect: the session's temporary server.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.jobs import run_update_cli
from flows.update import update_app_flow
from labkeeper import update as core
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import stop_pid
from labkeeper.locallab.sshd import LocalSshd
from labkeeper.pvesim import Simulator
from tests.integration.test_doctor_flow import _flow_run_record

pytestmark = pytest.mark.integration

TOKEN_ID = "labkeeper@pve!upd"
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
FAST_GATE = {"initial_delay": 0, "interval": 0.1, "deadline": 1, "successes": 2}


@dataclass
class Guest:
    name: str
    vmid: int
    rootfs: Path
    port: int

    @property
    def www(self) -> Path:
        return self.rootfs / "www"

    def version(self) -> str:
        return (self.www / "VERSION").read_text()

    def set_command(self, version: str, *, health: str = "ok", exit_code: int = 0
                    ) -> list[str]:
        """An update command writing a version (and the health file) into the rootfs."""
        script = (f"printf %s {version} > {self.www}/VERSION && "
                  f"printf %s {health} > {self.www}/health && exit {exit_code}")
        return ["sh", "-c", script]


@dataclass
class UpdLab:
    sim: Simulator
    workdir: Path
    sshd: LocalSshd
    secret_file: Path
    guests: dict[str, Guest]
    procs: list[subprocess.Popen[bytes]]
    tuning: dict[str, Any] = field(default_factory=dict)
    """settings.tuning of the inventories :meth:`write` writes."""

    def guest(self, name: str, vmid: int, *, storage: str = "local-lvm") -> Guest:
        rootfs = self.workdir / f"rootfs-{vmid}"
        (rootfs / "www").mkdir(parents=True)
        (rootfs / "www" / "VERSION").write_text("1.0")
        (rootfs / "www" / "health").write_text("ok")
        self.sim.add_guest(vmid, "lxc", node="pve1", status="running", disk_storage=storage)
        self.sim.set_rootfs_dir(vmid, rootfs)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
             "--directory", str(rootfs / "www")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        wait_for_port("127.0.0.1", port, timeout=10)
        g = Guest(name, vmid, rootfs, port)
        self.guests[name] = g
        return g

    def app(self, g: Guest, update: list[list[str]], **over: Any) -> dict[str, Any]:
        a: dict[str, Any] = {
            "name": g.name, "guest": g.name, "strategy": "commands",
            "commands": {"update": update, "version": ["cat", str(g.www / "VERSION")]},
            "health": [{"name": "health page",
                        "http": {"url": f"http://127.0.0.1:{g.port}/health",
                                 "body_contains": "ok"}, "timeout": 2}],
            "gate": FAST_GATE,
        }
        a.update(over)
        return a

    def write(self, apps: list[dict[str, Any]], *, storages: dict[str, str] | None = None
              ) -> Path:
        storages = storages or {}
        guests = []
        for g in self.guests.values():
            guests.append({
                "name": g.name, "vmid": g.vmid, "type": "lxc", "node": "pve1",
                "template": TEMPLATE,
                "resources": {"cores": 1, "memory_mb": 512, "disk_gb": 4,
                              "storage": storages.get(g.name, "local-lvm")},
                "network": [{"ip": f"10.0.9.{g.vmid % 200 + 10}/24", "gateway": "10.0.9.1"}],
                "ssh": {"address": "127.0.0.1", "port": self.sshd.port},
            })
        inv = {
            "version": 1, "lab": {"name": "update-test"},
            "settings": {"state_dir": str(self.workdir / "state"), "tuning": self.tuning},
            "proxmox": {
                "host": "127.0.0.1", "port": self.sim.port, "token_id": TOKEN_ID,
                "token_secret": f"file:{self.secret_file}",
                "tls": {"ca_file": self.sim.ca_file}, "timeout": 10, "task_timeout": 30,
                "nodes": [{"name": "pve1"}],
                "storages": [
                    {"name": "local", "type": "dir",
                     "content": ["vztmpl", "backup", "iso", "rootdir", "images"]},
                    {"name": "local-lvm", "type": "lvmthin", "content": ["images", "rootdir"]},
                ],
            },
            "ssh": {"user": self.sshd.user, "key": self.sshd.user_key_ref,
                    "known_hosts": str(self.sshd.known_hosts_path), "connect_timeout": 5},
            "guests": guests,
            "apps": apps,
        }
        path = self.workdir / "lab.yaml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path

    def inv(self) -> Inventory:
        return load_inventory(self.workdir / "lab.yaml")

    def writes(self) -> list[dict[str, Any]]:
        return [r for r in self.sim.requests if r["method"] != "GET"]

    def snapshots(self, vmid: int) -> list[str]:
        guest = self.sim.guest(vmid)
        assert guest is not None
        return sorted(guest["snapshots"])


@pytest.fixture
def upd(tmp_path: Path, local_sshd: LocalSshd) -> Iterator[UpdLab]:
    secret = str(uuid.uuid4())
    secret_file = tmp_path / "pve-token"
    secret_file.write_text(secret + "\n")
    secret_file.chmod(0o600)
    sim = Simulator(nodes=("pve1",), task_duration=0.01, tokens={TOKEN_ID: secret})
    # the node's dir storage also holds container volumes here (vzdump-rollback tests)
    sim.state["storages"]["local"]["content"] += ",rootdir,images"
    sim.start()
    lab = UpdLab(sim, tmp_path, local_sshd, secret_file, {}, [])
    try:
        yield lab
    finally:
        for proc in lab.procs:
            stop_pid(proc.pid, proc=proc, grace=2)
        sim.stop()


def result_rows(state: Any) -> list[dict[str, Any]]:
    if state.is_completed():
        data = state.result()
        return data if isinstance(data, list) else []
    exc = state.result(raise_on_failure=False)
    return getattr(exc, "rows", [])


def http_body(g: Guest, path: str = "health") -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{g.port}/{path}", timeout=5) as r:
        return r.read().decode()


# ------------------------------------------------------------------------------- snapshot


def test_broken_update_fails_health_and_is_rolled_back_by_snapshot(upd: UpdLab,
                                                                   prefect_harness):
    web = upd.guest("web", 300)
    path = upd.write([upd.app(web, [web.set_command("2.0-broken", health="fail")])])
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)

    assert state.is_failed() and state.name == "RolledBack", (state.name, state.message)
    (row,) = result_rows(state)
    assert row["status"] == "rolled-back"
    assert (row["before"], row["attempted"], row["after"]) == ("1.0", "2.0-broken", "1.0")
    assert "GateFailed" in row["detail"] and "healthy again" in row["detail"]
    assert web.version() == "1.0" and http_body(web) == "ok"
    assert upd.sim.guest(300)["status"] == "running"  # type: ignore[index]
    rollbacks = [r for r in upd.writes() if r["path"].endswith("/rollback")]
    assert len(rollbacks) == 1 and core.PREFIX in rollbacks[0]["path"]
    assert not core.journal_path(upd.inv(), "web").exists()

    _run, logs, arts = _flow_run_record(state)
    summary = next(a for a in arts if a.key == "update-summary").data
    assert "| ↩️ | web | rolled-back |" in summary and "| 1.0 | 2.0-broken | 1.0 |" in summary
    assert any("Rollback hook" in log.message or "rolling lxc 300 back" in log.message
               for log in logs)
    assert any("web| " in log.message or "$ sh -c" in log.message for log in logs)
    events = rolled_back_events("web", attempted="2.0-broken")
    assert events, "no labkeeper.update.rolled_back event for web"
    assert events[0]["payload"]["before"] == "1.0"


def rolled_back_events(app: str, *, attempted: str) -> list[dict[str, Any]]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    async def read() -> list[dict[str, Any]]:
        async with get_client() as client:
            flt = EventFilter(event=EventNameFilter(name=["labkeeper.update.rolled_back"]),
                              resource=EventResourceFilter(id=[f"labkeeper.app.{app}"]))
            for _ in range(100):
                page = await client.request("POST", "/events/filter",
                                            json={"filter": flt.model_dump(mode="json"),
                                                  "limit": 50})
                found = [e for e in page.json()["events"]
                         if e["payload"].get("attempted") == attempted]
                if found:
                    return found
                await asyncio.sleep(0.1)
            return []

    return asyncio.run(read())


def test_good_update_keeps_the_new_version_and_only_the_newest_snapshot(upd: UpdLab,
                                                                        prefect_harness):
    web = upd.guest("web", 302)
    path = upd.write([upd.app(web, [web.set_command("2.0")])])
    first = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert first.is_completed(), first.message
    (row,) = result_rows(first)
    assert (row["status"], row["before"], row["attempted"], row["after"]) == \
        ("updated", "1.0", "2.0", "2.0")
    assert web.version() == "2.0"
    (snap1,) = upd.snapshots(302)
    assert snap1.startswith(core.PREFIX)

    path = upd.write([upd.app(web, [web.set_command("3.0")])])
    second = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert second.is_completed(), second.message
    (row,) = result_rows(second)
    assert row["after"] == "3.0" and row["removed"] == snap1
    (snap2,) = upd.snapshots(302)
    assert snap2 != snap1  # keep_snapshots: 1 — the older one was deleted


def test_failing_update_command_is_rolled_back(upd: UpdLab, prefect_harness):
    web = upd.guest("web", 303)
    path = upd.write([upd.app(web, [web.set_command("2.0-half", exit_code=3),
                                    ["sh", "-c", "echo never runs"]])])
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.name == "RolledBack", state.message
    (row,) = result_rows(state)
    assert "UpdateFailed" in row["detail"] and "exited 3" in row["detail"]
    assert row["after"] == "1.0" and web.version() == "1.0"


def test_rollback_none_leaves_the_failed_update_and_fails_loudly(upd: UpdLab,
                                                                 prefect_harness):
    web = upd.guest("web", 304)
    path = upd.write([upd.app(web, [web.set_command("2.0", health="fail")],
                              rollback="none")])
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_failed() and state.name == "Failed"
    (row,) = result_rows(state)
    assert row["status"] == "failed" and "rollback-failed" in row["detail"]
    assert web.version() == "2.0"
    assert [r for r in upd.writes() if "snapshot" in r["path"]] == []


# ------------------------------------------------------------------------------- vzdump


def test_storage_without_snapshots_rolls_back_from_the_pre_update_vzdump(upd: UpdLab,
                                                                        prefect_harness):
    web = upd.guest("web", 310, storage="local")
    path = upd.write([upd.app(web, [web.set_command("2.0-broken", health="fail")])],
                     storages={"web": "local"})
    assert upd.inv().rollback_mode("web") == "vzdump"
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.name == "RolledBack", state.message
    (row,) = result_rows(state)
    assert row["protection"].startswith("vzdump local:backup/vzdump-lxc-310-")
    assert "restored from" in row["detail"]
    assert web.version() == "1.0" and http_body(web) == "ok"
    paths = [(r["method"], r["path"]) for r in upd.writes()]
    assert ("POST", "/api2/json/nodes/pve1/vzdump") in paths
    assert ("POST", "/api2/json/nodes/pve1/lxc") in paths  # restore --force
    assert upd.sim.guest(310)["status"] == "running"  # type: ignore[index]
    assert [r for r in upd.writes() if "/snapshot" in r["path"]] == []


# ------------------------------------------------------------------------------- crash


def test_crash_between_update_and_gate_is_finished_by_the_next_run(upd: UpdLab,
                                                                  prefect_harness):
    web = upd.guest("web", 320)
    path = upd.write([upd.app(web, [web.set_command("2.0-broken", health="fail")])])
    inv = upd.inv()
    # a run that died right after the update command: protect + update, no gate
    with core.Session(inv, "web") as s:
        versions = core.record_versions(s)
        prot = core.protect(s, "20250101-000000", versions)
        core.write_journal(inv, core.Journal("web", "20250101-000000", "protected", prot,
                                             versions.values))
        core.run_update(s)
    assert web.version() == "2.0-broken"

    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.name == "RolledBack", state.message
    (row,) = result_rows(state)
    assert row["status"] == "rolled-back" and "died after 'protected'" in row["detail"]
    assert web.version() == "1.0" and not core.journal_path(inv, "web").exists()
    assert upd.sim.guest(320)["status"] == "running"  # type: ignore[index]


def test_crash_after_a_good_update_keeps_it_and_cleans_up(upd: UpdLab, prefect_harness):
    web = upd.guest("web", 321)
    path = upd.write([upd.app(web, [web.set_command("2.0")], keep_snapshots=0)])
    inv = upd.inv()
    with core.Session(inv, "web") as s:
        versions = core.record_versions(s)
        prot = core.protect(s, "20250101-000000", versions)
        core.write_journal(inv, core.Journal("web", "20250101-000000", "updated", prot,
                                             versions.values, {"version": "2.0"}))
        core.run_update(s)
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    (row,) = result_rows(state)
    assert row["status"] == "recovered" and row["after"] == "2.0"
    assert row["removed"] == core.snapshot_name("web", "20250101-000000")
    assert upd.snapshots(321) == [] and web.version() == "2.0"


def age_journal(inv: Inventory, app: str, seconds: float) -> None:
    """Make the app's journal look ``seconds`` old (as a run that died long ago left it)."""
    import json

    path = core.journal_path(inv, app)
    data = json.loads(path.read_text())
    data["touched"] = data["started"] = time.time() - seconds
    path.write_text(json.dumps(data))


def crashed_after_update(upd: UpdLab, inv: Inventory, app: str) -> core.Protection:
    """A run that protected and updated, then died before its gate."""
    with core.Session(inv, app) as s:
        versions = core.record_versions(s)
        rid = core.new_run_id()
        prot = core.protect(s, rid, versions)
        core.write_journal(inv, core.Journal(app, rid, "updated", prot, versions.values))
        core.run_update(s)
    return prot


def test_a_stale_unfinished_update_is_never_rolled_back_automatically(upd: UpdLab,
                                                                      prefect_harness):
    web = upd.guest("web", 322)
    path = upd.write([upd.app(web, [web.set_command("2.0-broken", health="fail")])])
    inv = upd.inv()
    crashed_after_update(upd, inv, "web")
    age_journal(inv, "web", 7 * 24 * 3600)  # a week of data written since
    upd.sim.requests.clear()

    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_failed() and state.name == "NotUpdated", (state.name, state.message)
    (row,) = result_rows(state)
    assert row["status"] == "stale" and "resolve=rollback" in row["detail"]
    assert web.version() == "2.0-broken", "rolled back a week-old journal on its own"
    assert not [r for r in upd.writes() if r["path"].endswith("/rollback")]
    assert core.journal_path(inv, "web").exists()

    decided = update_app_flow(apps=["web"], lab=str(path), resolve="rollback",
                              return_state=True)
    assert decided.name == "RolledBack", decided.message
    assert web.version() == "1.0" and not core.journal_path(inv, "web").exists()


def test_a_stale_unfinished_update_kept_as_a_person_decided(upd: UpdLab, prefect_harness):
    web = upd.guest("web", 323)
    path = upd.write([upd.app(web, [web.set_command("2.0")], keep_snapshots=0)])
    inv = upd.inv()
    prot = crashed_after_update(upd, inv, "web")
    age_journal(inv, "web", 3 * 3600)
    state = update_app_flow(apps=["web"], lab=str(path), resolve="keep", return_state=True)
    assert state.is_completed(), state.message
    (row,) = result_rows(state)
    assert row["status"] == "recovered" and "kept as decided" in row["detail"]
    assert web.version() == "2.0" and prot.snapshot not in upd.snapshots(323)


def test_a_run_that_died_after_its_rollback_finished_is_not_rolled_back_again(
        upd: UpdLab, prefect_harness):
    web = upd.guest("web", 324)
    path = upd.write([upd.app(web, [web.set_command("2.0-broken", health="fail")])])
    inv = upd.inv()
    crashed_after_update(upd, inv, "web")
    with core.Session(inv, "web") as s:  # the rollback ran; the run died before noting it
        journal = core.read_journal(inv, "web")
        assert journal is not None
        journal.phase = "rolling-back"
        core.write_journal(inv, journal)
        core.rollback(s, journal.protection)
    assert web.version() == "1.0"
    upd.sim.requests.clear()
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.name == "RolledBack", state.message
    assert not [r for r in upd.writes() if r["path"].endswith("/rollback")], \
        "rolled back a second time without checking"
    assert web.version() == "1.0" and not core.journal_path(inv, "web").exists()


def test_the_pre_update_archive_is_protected_from_pruning_until_cleanup(upd: UpdLab,
                                                                       prefect_harness):
    from labkeeper import proxmox as px

    web = upd.guest("web", 312, storage="local")
    path = upd.write([upd.app(web, [web.set_command("2.0")], keep_snapshots=1)],
                     storages={"web": "local"})
    inv = upd.inv()
    prot = crashed_after_update(upd, inv, "web")  # the update depends on the archive now
    assert prot.volid is not None
    upd.sim.add_backup(312, int(time.time()) + 60, storage="local", notes="nightly")
    with core.Session(inv, "web") as s:  # the nightly job's retention: keep-last=1
        s.wait(px.prune_backups(s.api, "pve1", "local", vmid=312,
                                prune_backups={"keep-last": 1}))
        vols = {v.volid: v for v in px.backups(s.api, "pve1", "local", vmid=312)}
    assert prot.volid in vols and vols[prot.volid].protected, "retention pruned it"

    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_completed(), state.message  # recovered: healthy, kept
    with core.Session(inv, "web") as s:
        vols = {v.volid: v for v in px.backups(s.api, "pve1", "local", vmid=312)}
    assert prot.volid in vols and not vols[prot.volid].protected  # kept (1), unprotected


# ------------------------------------------------------------------------------- dry run


def test_dry_run_changes_nothing(upd: UpdLab, prefect_harness):
    web = upd.guest("web", 330)
    path = upd.write([upd.app(web, [web.set_command("2.0", health="fail")])])
    upd.sim.requests.clear()
    state = update_app_flow(apps=["web"], lab=str(path), dry_run=True, return_state=True)
    assert state.is_completed(), state.message
    (row,) = result_rows(state)
    assert row["status"] == "dry-run" and row["before"] == "1.0"
    assert row["protection"] == "snapshot (not taken)"
    assert upd.writes() == [] and web.version() == "1.0"
    assert upd.snapshots(330) == []
    assert not (upd.workdir / "state" / "updates" / "web.json").exists()
    _run, _logs, arts = _flow_run_record(state)
    summary = next(a for a in arts if a.key == "update-summary").data
    assert "printf %s 2.0" in summary


def test_unhealthy_app_is_not_updated_unless_forced(upd: UpdLab, prefect_harness):
    web = upd.guest("web", 331)
    (web.www / "health").write_text("down")
    path = upd.write([upd.app(web, [web.set_command("2.0")])])
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_completed() and state.name == "Skipped"
    assert "unhealthy before the update" in (state.message or "")
    assert web.version() == "1.0" and upd.writes() == []
    forced = update_app_flow(apps=["web"], lab=str(path), force=True, return_state=True)
    assert forced.is_completed(), forced.message
    assert web.version() == "2.0"


def test_outside_the_maintenance_window_the_app_is_skipped(upd: UpdLab, prefect_harness):
    web = upd.guest("web", 332)
    hour = time.gmtime().tm_hour
    window = {"start": f"{(hour + 2) % 24:02d}:00", "end": f"{(hour + 3) % 24:02d}:00",
              "timezone": "UTC"}
    path = upd.write([upd.app(web, [web.set_command("2.0")], maintenance_window=window)])
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.name == "Skipped" and "maintenance window" in (state.message or "")
    assert web.version() == "1.0"


# ------------------------------------------------------------------------------- batch


def test_canary_rolled_back_stops_the_batch(upd: UpdLab, prefect_harness):
    bad = upd.guest("bad", 340)
    good = upd.guest("good", 341)
    path = upd.write([upd.app(bad, [bad.set_command("2.0", health="fail")]),
                      upd.app(good, [good.set_command("2.0")])])
    state = update_app_flow(apps=["bad", "good"], lab=str(path), canary=True,
                            return_state=True)
    assert state.name == "RolledBack"
    rows = {r["app"]: r for r in result_rows(state)}
    assert rows["bad"]["status"] == "rolled-back"
    assert rows["good"]["status"] == "skipped" and "canary bad" in rows["good"]["detail"]
    assert good.version() == "1.0" and upd.snapshots(341) == []


def test_without_canary_the_batch_goes_on_in_order(upd: UpdLab, prefect_harness):
    bad = upd.guest("bad", 342)
    good = upd.guest("good", 343)
    path = upd.write([upd.app(bad, [bad.set_command("2.0", health="fail")]),
                      upd.app(good, [good.set_command("2.0")])])
    state = update_app_flow(apps=["good", "bad"], lab=str(path), return_state=True)
    assert state.name == "RolledBack"
    assert [(r["app"], r["status"]) for r in result_rows(state)] == \
        [("good", "updated"), ("bad", "rolled-back")]
    assert good.version() == "2.0" and bad.version() == "1.0"


# ------------------------------------------------------------------------------- concurrency


def hold_lock_in_a_process(lab: Path, guest: str) -> subprocess.Popen[bytes]:
    """Another process holding the guest's update lock (a run in progress)."""
    code = ("import sys, time\n"
            "from labkeeper import update as core\n"
            "from labkeeper.inventory import load_inventory\n"
            "inv = load_inventory(sys.argv[1])\n"
            "with core.guest_lock(inv, sys.argv[2], holder='update of someone', timeout=5):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lab), guest],
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


def test_an_update_of_a_busy_guest_is_blocked_not_a_silent_success(upd: UpdLab,
                                                                   prefect_harness, capsys):
    web = upd.guest("web", 350)
    upd.tuning["update_lock_timeout"] = 0.5
    path = upd.write([upd.app(web, [web.set_command("2.0")])])
    holder = hold_lock_in_a_process(path, "web")
    try:
        upd.sim.requests.clear()
        state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
        code = run_update_cli(path, ["web"], dry_run=False, force=False)
    finally:
        stop_pid(holder.pid, proc=holder, grace=2)
    assert state.is_failed() and state.name == "NotUpdated", (state.name, state.message)
    assert "another update of guest web is running (update of someone, pid" in state.message
    (row,) = result_rows(state)
    assert row["status"] == "blocked"
    assert code == 3 and "blocked" in capsys.readouterr().out
    assert web.version() == "1.0" and upd.writes() == []


def test_a_killed_lock_holder_does_not_lock_the_guest_out(upd: UpdLab, prefect_harness):
    import signal

    web = upd.guest("web", 351)
    upd.tuning["update_lock_timeout"] = 0
    path = upd.write([upd.app(web, [web.set_command("2.0")])])
    holder = hold_lock_in_a_process(path, "web")
    holder.send_signal(signal.SIGKILL)  # the kernel drops its flock
    holder.wait(10)
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    assert web.version() == "2.0"


def test_two_apps_on_one_guest_keep_each_others_protection(upd: UpdLab, prefect_harness):
    g = upd.guest("web", 352)
    apps = [upd.app(g, [g.set_command("2.0")], keep_snapshots=0),
            {**upd.app(g, [["true"]], keep_snapshots=0), "name": "api"}]
    path = upd.write(apps)
    inv = upd.inv()
    # api's update died after protecting: its journal names its snapshot
    with core.Session(inv, "api") as s:
        rid = core.new_run_id()
        prot = core.protect(s, rid, core.record_versions(s))
        core.write_journal(inv, core.Journal("api", rid, "protected", prot))
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    (row,) = result_rows(state)
    assert prot.snapshot in upd.snapshots(352), "web's cleanup deleted api's protection"
    assert row["removed"].startswith(core.snapshot_name("web", "x")[:-1])
    assert prot.snapshot not in row["removed"]


def test_protect_refuses_a_snapshot_name_it_did_not_take(upd: UpdLab, prefect_harness):
    g = upd.guest("web", 353)
    upd.write([upd.app(g, [g.set_command("2.0")])])
    inv = upd.inv()
    rid = core.new_run_id()
    with core.Session(inv, "web") as s:
        versions = core.record_versions(s)
        core.protect(s, rid, versions)  # a snapshot of that name, not this run's
        with pytest.raises(core.UpdateFailed, match="did not take it: not reusing it"):
            core.protect(s, rid, versions)
        assert core.protect(s, rid, versions, resume=True).snapshot == \
            core.snapshot_name("web", rid)


# ------------------------------------------------------------------------------- CLI


def test_cli_entry_exit_codes_dry_run_zero_rollback_two(upd: UpdLab, prefect_harness, capsys):
    web = upd.guest("web", 360)
    path = upd.write([upd.app(web, [web.set_command("2.0", health="fail")])])
    assert run_update_cli(path, ["web"], dry_run=True, force=False) == 0
    assert "dry-run" in capsys.readouterr().out
    assert run_update_cli(path, ["web"], dry_run=False, force=False) == 2
    out = capsys.readouterr().out
    assert "RolledBack" in out and "rolled-back" in out


def test_linked_databases_are_backed_up_before_the_update(upd: UpdLab, lab, prefect_harness):
    from labkeeper import restic

    web = upd.guest("web", 309)
    path = upd.write([upd.app(web, [web.set_command("2.0")], databases=["appdb"])])
    inv = yaml.safe_load(path.read_text())
    base = yaml.safe_load(lab.inventory_path.read_text())
    inv["repositories"] = base["repositories"]
    inv["databases"] = [{**d, "drill": {"enabled": False}}
                        for d in base["databases"] if d["name"] == "appdb"]
    path.write_text(yaml.safe_dump(inv, sort_keys=False))

    def appdb_dumps() -> set[str]:
        return {s.id for s in restic.find_snapshots(
            lab.repo, tags=["labkeeper", "db:127.0.0.1/appdb", "kind:pg_dump"],
            host="update-test")}

    before = appdb_dumps()
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    assert web.version() == "2.0"
    assert len(appdb_dumps() - before) == 1, "no pre-update dump of the linked database"
