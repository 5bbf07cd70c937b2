"""`labkeeper status` against the real lab: restic snapshots, Prefect history, exit code."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from cli.main import app
from labkeeper import pg_backup
from labkeeper.inventory import load_inventory


def _inventory(lab, tmp_path: Path, rpo_hours: float) -> Path:
    inv = yaml.safe_load(lab.inventory_path.read_text())
    for not_backed_up_here in ("vzdump_jobs", "path_backups"):
        inv.pop(not_backed_up_here, None)
    for db in inv["databases"]:
        db["drill"] = {"enabled": False, "rpo_hours": rpo_hours}
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    return path


def test_status_is_green_after_fresh_backups_and_red_when_they_are_older_than_the_rpo(
        lab, prefect_harness, tmp_path: Path):
    inv_path = _inventory(lab, tmp_path, rpo_hours=24)
    inv = load_inventory(inv_path)
    for db in inv.databases:
        pg_backup.backup_database(inv, db.name)

    ok = CliRunner().invoke(app, ["status", "--lab", str(inv_path), "--json"])
    rows = json.loads(ok.stdout)
    dbs = {r["target"]: r for r in rows if r["section"] == "database"}
    assert {dbs["appdb"]["state"], dbs["photos"]["state"]} == {"ok"}
    assert dbs["appdb"]["age_hours"] < 1
    assert not [r for r in rows if r["section"] == "source"], rows
    assert ok.exit_code == 0, rows

    strict = _inventory(lab, tmp_path / "strict", rpo_hours=0.0001)
    late = CliRunner().invoke(app, ["status", "--lab", str(strict), "--json"])
    assert late.exit_code == 1
    assert {r["state"] for r in json.loads(late.stdout) if r["section"] == "database"} == \
        {"late"}


def test_status_lists_failed_runs_read_from_the_prefect_api(prefect_harness, tmp_path: Path):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deadman import backup_watch_flow

    path = tmp_path / "lab.yaml"
    path.write_text(f"""
version: 1
lab: {{name: history}}
settings: {{state_dir: {tmp_path / "state"}}}
repositories: [{{name: gone, url: {tmp_path / "no-repo"}, password: env:LK_UNSET_RP}}]
databases: [{{name: ghost, host: 127.0.0.1}}]
""")
    state = backup_watch_flow(lab=str(path), return_state=True)
    assert state.is_failed()

    async def run_name() -> str:
        async with get_client() as client:
            return (await client.read_flow_run(state.state_details.flow_run_id)).name

    name = asyncio.run(run_name())
    res = CliRunner().invoke(app, ["status", "--lab", str(path), "--json"])
    assert res.exit_code == 1
    runs = {r["target"]: r for r in json.loads(res.stdout) if r["section"] == "runs"}
    assert runs[f"backup-watch/{name}"]["detail"] == "Failed"
