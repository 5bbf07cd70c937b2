"""Deployments run the way the UI's Run button runs them: server, pool, worker, history."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import yaml

from labkeeper.locallab.lab import write_secret

pytestmark = pytest.mark.e2e


def _client_call(stack, coro_fn):
    import os

    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            return await coro_fn(client)

    with temporary_settings({PREFECT_API_URL: stack.server.api_url}):
        old = os.environ.get("PREFECT_API_URL")
        try:
            return asyncio.run(go())
        finally:
            if old is not None:
                os.environ["PREFECT_API_URL"] = old


def _run_deployment(stack, name: str, parameters: dict | None = None, timeout: float = 180):
    """Create a flow run from the deployment (what the UI's Run button does), wait for it."""

    async def create(client):
        dep = await client.read_deployment_by_name(name)
        return await client.create_flow_run_from_deployment(dep.id, parameters=parameters or {})

    run = _client_call(stack, create)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = _client_call(stack, lambda c: c.read_flow_run(run.id))
        if current.state and current.state.is_final():
            return current
        time.sleep(0.5)
    log = (stack.server.home / "worker.log")
    raise AssertionError(f"flow run {run.id} not finished in {timeout}s; worker log:\n"
                         + (Path(stack.worker.log_path).read_text()[-3000:] if log else ""))


def _history(stack, run_id, *, expect_log: str = "", wait: float = 20.0):
    """Logs, artifacts and task runs of a flow run. The run's process ships its logs in
    batches, possibly just after the final state: wait for ``expect_log`` to arrive."""
    deadline = time.monotonic() + wait
    while True:
        logs, arts, tasks = _read_history(stack, run_id)
        if expect_log in "\n".join(log.message for log in logs) or time.monotonic() > deadline:
            return logs, arts, tasks
        time.sleep(0.5)


def _read_history(stack, run_id):
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    async def read(client):
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
        tasks = await client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id])))
        return logs, arts, tasks

    return _client_call(stack, read)


def test_every_deployment_in_prefect_yaml_is_created_with_its_schedule(prefect_stack):
    declared = yaml.safe_load(Path("prefect.yaml").read_text())["deployments"]

    async def read(client):
        return await client.read_deployments()

    deployments = {d.name: d for d in _client_call(prefect_stack, read)}
    for d in declared:
        assert d["name"] in deployments
        dep = deployments[d["name"]]
        assert dep.work_pool_name == "homelab"
        crons = [s.schedule.cron for s in dep.schedules]
        assert crons == [s["cron"] for s in d.get("schedules") or []]


def test_doctor_deployment_run_completes_and_leaves_history(prefect_stack):
    started = time.monotonic()
    run = _run_deployment(prefect_stack, "doctor/doctor")
    elapsed = time.monotonic() - started
    assert run.state.is_completed(), run.state.message
    logs, arts, tasks = _history(prefect_stack, run.id, expect_log="doctor:")
    assert {t.name.split("-")[1] for t in tasks} >= {"proxmox", "ssh", "database", "repository",
                                                     "bucket"}
    assert all(t.state.is_completed() for t in tasks)
    assert any("doctor:" in log.message for log in logs)
    table = next(a for a in arts if a.key == "doctor")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["status"] for r in data} == {"ok"}
    assert run.start_time and run.end_time and run.total_run_time.total_seconds() > 0
    print(f"doctor via deployment: trigger→Completed {elapsed:.1f}s")


def test_a_failing_deployment_run_shows_failed_with_its_error_in_the_logs(
        prefect_stack, lab, tmp_path_factory):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    d = tmp_path_factory.mktemp("broken")
    bad = write_secret(d / "wrong", "wrong-password-for-e2e")
    inv["databases"][1]["password"] = f"file:{bad}"
    path = d / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    run = _run_deployment(prefect_stack, "doctor/doctor", {"lab": str(path)})
    assert run.state.is_failed()
    assert "database:photos" in run.state.message
    logs, _arts, _tasks = _history(prefect_stack, run.id, expect_log="checks failed")
    text = "\n".join(log.message for log in logs)
    assert "checks failed: database:photos" in text
    assert "password authentication failed" in text
    assert "wrong-password-for-e2e" not in text


def test_nightly_pg_backup_deployment_run_backs_up_every_database(prefect_stack, lab):
    from labkeeper import restic

    before = {s.id for s in restic.snapshots(lab.repo)}
    run = _run_deployment(prefect_stack, "pg_backup/nightly-pg-backup", timeout=300)
    assert run.state.is_completed(), run.state.message
    _logs, arts, tasks = _history(prefect_stack, run.id, expect_log="pg_backup:")
    table = next(a for a in arts if a.key == "pg-backup")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["database"] for r in data} >= {"appdb", "photos"}
    new = [s for s in restic.snapshots(lab.repo) if s.id not in before]
    assert {t for s in new for t in s.tags if t.startswith("db:")} >= \
        {"db:127.0.0.1/appdb", "db:127.0.0.1/photos"}
    assert all(t.state.is_completed() for t in tasks)
