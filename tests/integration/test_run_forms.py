"""Issue 21, part 2, on a real (temporary) Prefect server: a runbook's own flow runs
with the parameters of its Run form; `labkeeper serve --sync-schedules` puts the forms
on deployments `prefect deploy` made; backup-watch publishes "is my lab safe?" as the
artifact ``lab-status``."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from flows.deadman import STATUS_KEY, BackupsLate, backup_watch_flow
from flows.runbook import runbook_as_flow
from labkeeper import restic
from labkeeper.locallab.lab import write_secret
from tests.fixtures.restic_keys import cheap_key
from tests.integration.test_doctor_flow import _flow_run_record

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"


def _runbook(tmp: Path) -> Path:
    path = tmp / "greet.yaml"
    path.write_text("""
version: 1
name: greet
description: Say hello to someone.
params:
  who: {type: string, description: Whom to greet.}
  times: {type: int, default: 2, description: How often.}
steps:
  - id: hello
    note: "hello {{ who }} x{{ times }}"
""")
    return path


def _small_lab(tmp: Path) -> Path:
    path = tmp / "lab.yaml"
    path.write_text(f"version: 1\nlab: {{name: forms}}\nsettings: {{state_dir: {tmp / 'st'}}}\n")
    return path


def test_a_runbooks_own_flow_runs_with_its_typed_parameters(prefect_harness, tmp_path: Path):
    fl = runbook_as_flow(_runbook(tmp_path))
    lab = _small_lab(tmp_path)
    state = fl(who="ann", times=3, lab=str(lab), return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["status"] == "ok" and row["detail"] == "hello ann x3"
    run, _logs, arts = _flow_run_record(state)
    assert run.parameters == {"who": "ann", "times": 3, "lab": str(lab), "dry_run": False,
                              "yes": False}
    assert "runbook-greet" in {a.key for a in arts}

    with pytest.raises(TypeError, match="who"):  # required, as the form marks it
        fl(lab=str(lab))


def test_sync_puts_the_run_forms_on_deployments_prefect_deploy_made(prefect_harness,
                                                                    tmp_path: Path):
    from prefect.client.orchestration import get_client

    from deployments.forms import put_forms
    from flows.runbook import RUNBOOK_FLOWS
    from labkeeper.inventory import parse_inventory

    fl = RUNBOOK_FLOWS["restore-database"]
    name = f"forms-{tmp_path.name}"[:60]
    dep_id = fl.to_deployment(name=name).apply()  # Prefect's own schema, as `prefect deploy`
    inv = parse_inventory("""
version: 1
lab: {name: t}
repositories: [{name: r, url: /srv/restic, password: env:RP}]
databases: [{name: appdb, host: db1}, {name: wiki, host: db1}]
""", "t.yaml")

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with get_client() as client:
            before = (await client.read_deployment(dep_id)).parameter_openapi_schema
            await put_forms(client, fl, [name], inv)
            after = (await client.read_deployment(dep_id)).parameter_openapi_schema
            return before, after

    before, after = asyncio.run(go())
    assert before["properties"]["database"]["title"] == "database"
    assert "enum" not in before["properties"]["database"]
    db = after["properties"]["database"]
    assert db["title"] == "Database" and db["enum"] == ["appdb", "wiki"]
    assert db["description"].startswith("The database to restore")
    assert after["properties"]["dry_run"]["title"] == "Dry run (change nothing)"


# -- "is my lab safe?" on the Artifacts page -------------------------------------------


def _backup(repo: restic.Repo, lab: str, db: str, when: datetime) -> None:
    """A dump of the database's series and its manifest, as pg_backup stores them, taken
    at ``when`` (a dump counts only with its manifest)."""
    bid = f"{db}-{when:%Y%m%d%H%M%S}"
    for kind, name in (("pg_dump", f"{db}.sql"), ("pg_manifest", f"{db}.manifest.json")):
        argv = restic.backup_stdin_argv(repo, filename=name, host=lab, tags=[
            "labkeeper", f"db:{HOST}/{db}", f"kind:{kind}", f"backup:{bid}"])
        restic.run_restic(repo, (*argv, "--time", when.strftime("%Y-%m-%d %H:%M:%S")),
                          timeout=60, input=f"-- {kind} of {db}\n".encode())


def _latest_artifact(key: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactCollectionFilter, ArtifactCollectionFilterKey

    async def read() -> Any:
        async with get_client() as client:
            (art,) = await client.read_latest_artifacts(artifact_filter=ArtifactCollectionFilter(
                key=ArtifactCollectionFilterKey(any_=[key])))
            return art

    return asyncio.run(read())


def test_backup_watch_publishes_the_labs_status_under_a_stable_key(prefect_harness,
                                                                  tmp_path: Path):
    lab_name = "status-lab"
    secret = write_secret(tmp_path / "restic-password", "status-repo-password-1")
    repo = restic.Repo(url=str(tmp_path / "repo"), password=SecretStr("status-repo-password-1"),
                       cache_dir=str(tmp_path / "cache"))
    restic.init(repo)
    cheap_key(repo)
    now = datetime.now()
    _backup(repo, lab_name, "fresh_db", now - timedelta(hours=1))
    _backup(repo, lab_name, "stale_db", now - timedelta(hours=60))
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"""
version: 1
lab: {{name: {lab_name}}}
settings: {{state_dir: {tmp_path / "state"}}}
repositories:
  - {{name: local, url: {tmp_path / "repo"}, password: "file:{secret}"}}
databases:
  - {{name: fresh_db, host: {HOST}, user: u, drill: {{enabled: false, rpo_hours: 26}}}}
  - {{name: stale_db, host: {HOST}, user: u, drill: {{enabled: false, rpo_hours: 26}}}}
""")
    state = backup_watch_flow(lab=str(lab), return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), BackupsLate)
    _run, _logs, arts = _flow_run_record(state)
    (mine,) = [a for a in arts if a.key == STATUS_KEY]
    page = mine.data
    assert f"# Is {lab_name} safe?" in page
    assert "❌ **" in page and "stale_db" in page.split("\n")[2]  # the answer first
    rows = {line.split("|")[3].strip(): line for line in page.splitlines()
            if line.startswith("| ") and "database" in line}
    assert " late " in rows["stale_db"] and " ok " in rows["fresh_db"]
    assert "run history not readable" not in page  # read inside the flow run

    # the next run replaces it: the Artifacts page shows the latest answer under one key
    _backup(repo, lab_name, "stale_db", datetime.now() - timedelta(minutes=5))
    again = backup_watch_flow(lab=str(lab), return_state=True)
    assert again.is_completed(), again.message
    latest = _latest_artifact(STATUS_KEY)
    assert latest.flow_run_id == again.state_details.flow_run_id
    fixed = {line.split("|")[3].strip(): line for line in latest.data.splitlines()
             if line.startswith("| ") and "database" in line}
    assert " ok " in fixed["stale_db"] and " ok " in fixed["fresh_db"]
    # the watch's own red run from a moment ago counts, as in `labkeeper status`
    assert "backup-watch" in latest.data
