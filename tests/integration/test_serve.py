"""`labkeeper serve` and `labkeeper metrics serve` as real processes: /metrics scraped over
HTTP and parsed with prometheus_client; the deployments served on the inventory's
schedules; `serve --sync-schedules` for several machines. Every process is stopped by PID."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.serve import load_deployments, sync_schedules
from labkeeper import metrics
from labkeeper.inventory import load_inventory
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import Service, log_tail

LABKEEPER = str(Path(sys.executable).parent / "labkeeper")
REPO = Path(__file__).resolve().parents[2]


def _inventory(tmp: Path, *, metrics_port: int | None = None) -> Path:
    listen = (f"  metrics: {{listen_address: 127.0.0.1, listen_port: {metrics_port}}}\n"
              if metrics_port else "")
    path = tmp / "lab.yaml"
    path.write_text(f"""
version: 1
lab: {{name: served, timezone: Europe/Berlin}}
settings:
  state_dir: {tmp / "state"}
{listen}repositories: [{{name: r, url: {tmp / "repo"}, password: env:LK_UNUSED_RP}}]
databases:
  - {{name: early, host: 127.0.0.1, schedule: "0 2 * * *"}}
  - {{name: late, host: 127.0.0.1, schedule: "0 3 * * *"}}
notifications: {{missing_backup_schedule: "0 * * * *"}}
""")
    metrics.record(tmp / "state", None, [
        metrics.Sample("labkeeper_backup_last_success_timestamp_seconds",
                       {"series": "db:127.0.0.1/early", "kind": "pg_dump"}, 1_790_000_000),
        metrics.Sample("labkeeper_drill_success", {"target": "db:early"}, 1)])
    return path


def _scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _stopped(svc: Service, port: int) -> int | None:
    proc = svc.proc
    svc.stop(grace=20)
    assert proc is not None and proc.poll() is not None, "still running after stop"
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    return proc.returncode


def _api(coro_fn):
    from prefect.client.orchestration import get_client

    async def go():
        async with get_client() as client:
            return await coro_fn(client)

    return asyncio.run(go())


def _schedules(full_name: str) -> list[tuple[str, str, dict]]:
    async def read(client):
        dep = await client.read_deployment_by_name(full_name)
        return [(s.schedule.cron, s.schedule.timezone, s.parameters)
                for s in await client.read_deployment_schedules(dep.id)]

    return sorted(_api(read), key=lambda s: s[0])


def test_metrics_serve_command_serves_the_store_until_stopped(tmp_path: Path):
    port = free_port()
    lab = _inventory(tmp_path, metrics_port=port)  # the port comes from the inventory
    svc = Service("metrics", (LABKEEPER, "metrics", "serve", "--lab", str(lab)),
                  log_path=tmp_path / "metrics.log", stop_signal=signal.SIGTERM)
    svc.start()
    try:
        wait_for_port("127.0.0.1", port, timeout=30)
        fams = _scrape(port)
    finally:
        code = _stopped(svc, port)
    ts = fams["labkeeper_backup_last_success_timestamp_seconds"]
    assert ts.type == "gauge"
    assert ts.samples[0].labels == {"series": "db:127.0.0.1/early", "kind": "pg_dump"}
    assert ts.samples[0].value == 1_790_000_000
    assert fams["labkeeper_drill_success"].samples[0].value == 1
    assert code == 0, log_tail(tmp_path / "metrics.log")


def test_serve_serves_metrics_alongside_and_the_deployments_on_the_inventory_schedules(
        prefect_harness, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    # left from before: an inventory that scheduled an app update
    for dep in load_deployments(inv=load_inventory(REPO / "lab.example.yaml")):
        if dep.name in ("update-apps", "nightly-pg-backup"):
            dep.apply()
    assert _schedules("update-app/update-apps") == [("0 4 * * 6", "Europe/Berlin",
                                                     {"apps": ["immich"]})]
    lab = _inventory(tmp_path)
    port = free_port()
    # SIGTERM, as systemd stops it: a suite started without job control hands its
    # children SIGINT ignored, and a serve killed after the grace leaves its runner
    svc = Service("serve", (LABKEEPER, "serve", "--lab", str(lab), "--metrics-port", str(port)),
                  log_path=tmp_path / "serve.log", cwd=REPO, stop_signal=signal.SIGTERM,
                  env={"PREFECT_API_URL": str(PREFECT_API_URL.value()),
                       "LABKEEPER_PREFECT_HOME": str(tmp_path / "local-home")})
    svc.start()
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        fams = _scrape(port)
        deadline = time.monotonic() + 90
        while True:
            svc.check_alive()
            served = _schedules("pg_backup/nightly-pg-backup")
            watch = None
            if served and served[0][1] == "Europe/Berlin":
                try:
                    watch = _schedules("backup-watch/backup-watch")
                except Exception:
                    watch = None
            if watch or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        apps = _schedules("update-app/update-apps")
    finally:
        _stopped(svc, port)
    assert fams["labkeeper_drill_success"].samples[0].labels == {"target": "db:early"}
    assert served == [("0 2 * * *", "Europe/Berlin", {"databases": ["early"]}),
                      ("0 3 * * *", "Europe/Berlin", {"databases": ["late"]})], \
        log_tail(tmp_path / "serve.log", 40)
    assert watch == [("0 * * * *", "Europe/Berlin", {})]
    assert apps == []  # no app has a schedule now: the old one is gone


def test_sync_schedules_puts_the_inventory_schedules_on_deployed_deployments(
        prefect_harness, tmp_path: Path):
    for dep in load_deployments():  # as `prefect deploy --all` creates them
        dep.apply()
    assert _schedules("pg_backup/nightly-pg-backup") == [("0 2 * * *", "UTC", {})]
    assert _schedules("update-app/update-apps") == []
    inv = load_inventory(REPO / "lab.example.yaml")
    lines = sync_schedules(inv)
    assert any(line.startswith("path_backup/nightly-path-backup: ") for line in lines)
    assert _schedules("path_backup/nightly-path-backup") == [
        ("0 3 * * *", "Europe/Berlin", {"names": ["compose-stacks"]}),
        ("30 3 * * *", "Europe/Berlin", {"names": ["photos"]}),
        ("45 3 * * *", "Europe/Berlin", {"names": ["nextcloud-data"]})]
    assert _schedules("update-app/update-apps") == [("0 4 * * 6", "Europe/Berlin",
                                                     {"apps": ["immich"]})]
    assert _schedules("doctor/doctor") == [("30 6 * * *", "UTC", {})]  # not from the inventory


def test_serve_stopped_with_sigterm_stops_the_runner_it_started(prefect_harness, tmp_path: Path):
    from prefect.settings import PREFECT_API_URL

    from labkeeper import local_server as ls

    home = tmp_path / "local-home"
    port = free_port()
    svc = Service("serve", (LABKEEPER, "serve", "--lab", str(_inventory(tmp_path)),
                            "--metrics-port", str(port)),
                  log_path=tmp_path / "serve.log", cwd=REPO, stop_signal=signal.SIGTERM,
                  env={"PREFECT_API_URL": str(PREFECT_API_URL.value()),
                       "LABKEEPER_PREFECT_HOME": str(home)})
    svc.start()
    srv = ls.local_server({"LABKEEPER_PREFECT_HOME": str(home)})
    try:
        deadline = time.monotonic() + 120
        while not ls.runner_socket(srv).exists():
            svc.check_alive()
            assert time.monotonic() < deadline, log_tail(tmp_path / "serve.log", 40)
            time.sleep(0.2)
        runner = int(json.loads(ls.runner_pidfile(srv).read_text())["pid"])
        wait_for_port("127.0.0.1", port, timeout=60)
    finally:
        _stopped(svc, port)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{runner}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{runner}").exists(), log_tail(tmp_path / "serve.log", 40)
    assert not ls.runner_socket(srv).exists()
