"""`labkeeper vzdump sync-jobs`: native /cluster/backup jobs from the inventory."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cli.jobs import sync_jobs_cli
from labkeeper import proxmox as px
from labkeeper.inventory import load_inventory
from tests.integration.test_vzdump_support import VzEnv, job

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VzEnv]:
    e = VzEnv(lab, tmp_path_factory.mktemp("syncjobs"))
    try:
        yield e
    finally:
        e.stop()


def _jobs(env: VzEnv) -> dict[str, dict]:
    with env.sim.lock:
        return {k: dict(v) for k, v in env.sim.state["backup_jobs"].items()}


def test_sync_jobs_shows_the_plan_then_creates_updates_and_removes_native_jobs(env: VzEnv,
                                                                               capsys):
    a, b = env.guests("native", {"pve1": 1, "pve2": 1})
    with env.sim.lock:
        env.sim.state["backup_jobs"]["backup-users-own"] = {
            "id": "backup-users-own", "type": "vzdump", "schedule": "sun 03:00", "all": 1}
    spec = job("nightly", "native", native=True, schedule="30 1 * * 6", mode="stop",
               notes_template="{{guestname}}")
    path = env.inventory([spec])
    assert sync_jobs_cli(path, apply=False) == 0
    out = capsys.readouterr().out
    assert "create    labkeeper-nightly" in out and "--apply" in out
    assert "labkeeper-nightly" not in _jobs(env)

    assert sync_jobs_cli(path, apply=True) == 0
    created = _jobs(env)["labkeeper-nightly"]
    assert created["schedule"] == "sat 01:30"
    assert created["vmid"] == f"{a},{b}"
    assert created["mode"] == "stop" and created["storage"] == "local"
    assert created["prune-backups"] == "keep-last=2"
    inv = load_inventory(str(path))
    api = px.connect(inv.proxmox)
    assert px.get_backup_job(api, "labkeeper-nightly").schedule == "sat 01:30"

    assert sync_jobs_cli(path, apply=False) == 0
    assert "unchanged labkeeper-nightly" in capsys.readouterr().out

    changed = env.inventory([{**spec, "mode": "snapshot", "retention": {"keep_daily": 3}}])
    assert sync_jobs_cli(changed, apply=True) == 0
    out = capsys.readouterr().out
    assert "update    labkeeper-nightly" in out and "mode: stop → snapshot" in out
    assert _jobs(env)["labkeeper-nightly"]["mode"] == "snapshot"
    assert _jobs(env)["labkeeper-nightly"]["prune-backups"] == "keep-daily=3"

    gone = env.inventory([{**spec, "native": False}])
    assert sync_jobs_cli(gone, apply=True) == 0
    assert "delete    labkeeper-nightly" in capsys.readouterr().out
    assert set(_jobs(env)) == {"backup-users-own"}
