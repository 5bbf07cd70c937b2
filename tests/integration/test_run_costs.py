"""What a run costs around its work (issue 24): the local Prefect server the command
line shares, globals stored only when changed, databases backed up side by side."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from labkeeper import local_server as ls
from labkeeper import pg_backup, pg_globals, restic
from labkeeper.inventory import load_inventory
from labkeeper.locallab.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def _cli_env(tmp_path: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.pop("PREFECT_PROFILE", None)
    env.update({"LABKEEPER_PREFECT_HOME": str(tmp_path / "prefect"),
                "LABKEEPER_PREFECT_PORT": str(port), "HOME": str(tmp_path / "home"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    return env


def _start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _flow_run_names(api_url: str) -> list[str]:
    from prefect.client.orchestration import PrefectClient

    async def read() -> list[str]:
        async with PrefectClient(api_url) as client:
            runs = await client.read_flow_runs()
            flows = {f.id: f.name for f in await client.read_flows()}
            return [flows.get(r.flow_id, "?") for r in runs if r.state and r.state.is_completed()]

    return asyncio.run(read())


def test_two_cli_runs_at_once_without_a_server_share_one_local_server_it_keeps(lab, tmp_path):
    port = free_port()
    env = _cli_env(tmp_path, port)
    srv = ls.local_server(env)
    try:
        # cron: the path backup starts while the database backup runs
        procs = [_start_cli(["backup", "run", "--lab", str(lab.inventory_path), "--db", "photos"],
                            env),
                 _start_cli(["paths", "run", "--lab", str(lab.inventory_path)], env)]
        outs = [p.communicate(timeout=600) for p in procs]
        for p, (out, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, out + err
            assert "database is locked" not in out + err
        said = [err.count("starting a local one") for _out, err in outs]
        assert sorted(said) == [0, 1], "exactly one command starts the server"
        assert ls.healthy(srv.api_url), "the server stays up for the next commands"
        assert "database is locked" not in srv.log_path.read_text()
        # the next command uses it: no start, its run lands in the same history
        again = _start_cli(["backup", "run", "--lab", str(lab.inventory_path), "--db", "photos"],
                           env)
        out, err = again.communicate(timeout=600)
        assert again.returncode == 0, out + err
        assert "starting a local one" not in err
        names = _flow_run_names(srv.api_url)
        assert names.count("pg_backup") == 2 and names.count("path_backup") == 1, names
    finally:
        ls.stop(srv)


def _inventory(lab, tmp_path: Path, **changes) -> Path:
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv.setdefault("settings", {})["state_dir"] = str(tmp_path / "state")
    for key, value in changes.items():
        inv[key] = value(inv) if callable(value) else value
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def test_unchanged_globals_are_not_stored_again_and_the_row_names_the_snapshot_holding_them(
        lab, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="labkeeper")
    inv = load_inventory(_inventory(lab, tmp_path))
    label = pg_backup.server_label(inv, inv.database("appdb"))
    repo = pg_backup.open_repo(inv, "lab-repo")

    def stored() -> list[str]:
        return [s.id for s in restic.find_snapshots(repo, tags=pg_backup.globals_tags(label),
                                                    host=inv.lab.name)]

    before = stored()
    first = pg_globals.backup_globals_if_changed(inv, label, ["appdb"])
    after_first = stored()
    assert first.snapshot_id in after_first and len(after_first) == len(before) + 1
    caplog.clear()
    second = pg_globals.backup_globals_if_changed(inv, label, ["appdb"])
    said = caplog.messages
    assert stored() == after_first, "unchanged globals: nothing stored"
    assert second.snapshot_id == first.snapshot_id
    assert second.status == first.status == "warning"  # the lab role: no role passwords
    assert "unchanged since" in second.detail and restic.short_id(first.snapshot_id) in \
        second.detail and "WITHOUT role passwords" in second.detail
    assert any("not stored again" in m for m in said)
    lab.postgres.psql_super("CREATE ROLE h12_new_role;")
    try:
        third = pg_globals.backup_globals_if_changed(inv, label, ["appdb"])
        assert third.snapshot_id != first.snapshot_id and third.snapshot_id in stored()
        assert "unchanged" not in third.detail
    finally:
        lab.postgres.psql_super("DROP ROLE IF EXISTS h12_new_role;")


def test_parallel_setting_backs_up_databases_side_by_side_in_one_run(lab, tmp_path,
                                                                      prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pg_backup import pg_backup_flow

    def databases(inv):
        first = inv["databases"][0]
        return [{**first, "name": f"par{i}", "globals": i == 0} for i in range(3)]

    path = _inventory(lab, tmp_path, databases=databases)
    text = yaml.safe_load(path.read_text())
    text["settings"]["pg_backup_parallel"] = 2
    path.write_text(yaml.safe_dump(text, sort_keys=False))
    state = pg_backup_flow(lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [r["database"] for r in rows if not r["database"].startswith("globals")] == \
        ["par0", "par1", "par2"]
    assert all(r["status"] in ("ok", "warning") for r in rows)

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    deadline = time.monotonic() + 30
    while True:  # task run states reach the API asynchronously
        spans = sorted((t.start_time, t.end_time) for t in asyncio.run(task_runs())
                       if t.name.startswith("backup-par") and t.end_time)
        if len(spans) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(spans) == 3
    overlaps = sum(b[0] < a[1] for a, b in itertools.pairwise(spans))
    assert overlaps >= 1, f"no two backups ran at the same time: {spans}"
    at_once = max(sum(s[0] <= t[0] < s[1] for s in spans) for t in spans)
    assert at_once <= 2, "never more than settings.pg_backup_parallel at once"
