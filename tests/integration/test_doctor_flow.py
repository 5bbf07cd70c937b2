"""The doctor flow against the real local lab, on a real (temporary) Prefect server."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import pytest
import yaml

from flows.doctor import doctor_flow
from labkeeper.locallab.lab import write_secret


def _flow_run_record(state):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in batches: send them now
    flow_run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            run = await client.read_flow_run(flow_run_id)
            logs = await client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            arts = await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return run, logs, arts

    return asyncio.run(read())


class ArgvWatcher:
    """Reads every process's /proc/<pid>/cmdline while a flow runs."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                try:
                    with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                        self.seen.add(f.read())
                except OSError:
                    continue
            time.sleep(0.005)

    def __enter__(self) -> ArgvWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _lab_secret_values(lab) -> list[str]:
    values = [p.read_text().strip() for p in (lab.secrets_dir).iterdir()]
    assert len(values) >= 5
    return values


def test_doctor_on_a_healthy_lab_completes_with_every_check_ok(lab, prefect_harness):
    state = doctor_flow(lab=str(lab.inventory_path), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    by = {(r["check"], r["target"]): r for r in rows}
    assert by[("proxmox", "127.0.0.1")]["status"] == "ok"
    assert "nodes: pve1, pve2, pve3" in by[("proxmox", "127.0.0.1")]["detail"]
    assert by[("ssh", "labhost")]["status"] == "ok"
    assert by[("database", "appdb")]["status"] == "ok"
    assert "PostgreSQL 15" in by[("database", "appdb")]["detail"]
    assert by[("repository", "lab-repo")]["status"] == "ok"
    assert by[("bucket", "lab-repo")]["status"] == "ok"
    assert all(r["status"] == "ok" for r in rows), rows
    _run, _logs, arts = _flow_run_record(state)
    table = next(a for a in arts if a.key == "doctor")
    assert table.type == "table"


def test_secrets_appear_in_no_log_parameter_artifact_or_child_argv(lab, prefect_harness):
    secrets = _lab_secret_values(lab)
    with ArgvWatcher() as watcher:
        state = doctor_flow(lab=str(lab.inventory_path), return_state=True)
    assert state.is_completed(), state.message
    run, logs, arts = _flow_run_record(state)
    assert logs, "expected run logs to check"
    assert any(b"restic" in c for c in watcher.seen), "the watcher saw no child process"
    haystacks = {
        "parameters": repr(run.parameters),
        "logs": "\n".join(log.message for log in logs),
        "artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in arts),
    }
    for secret in secrets:
        for where, text in haystacks.items():
            assert secret not in text, f"a lab secret leaked into the {where}"
        for cmdline in watcher.seen:
            assert secret.encode() not in cmdline, "a lab secret leaked into a child's argv"


def test_doctor_with_a_wrong_database_password_fails_and_names_the_check(lab, prefect_harness,
                                                                         tmp_path: Path):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    bad = write_secret(tmp_path / "wrong-pg-password", "not-the-right-password")
    inv["databases"][0]["password"] = f"file:{bad}"
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    state = doctor_flow(lab=str(path), return_state=True)
    assert state.is_failed()
    assert "database:appdb" in state.message
    _run, logs, arts = _flow_run_record(state)
    text = "\n".join(log.message for log in logs)
    assert "password authentication failed" in text
    table = next(a for a in arts if a.key == "doctor")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    rows = {(r["check"], r["target"]): r for r in data}
    assert rows[("database", "appdb")]["status"] == "fail"
    assert rows[("database", "photos")]["status"] == "ok"
    assert "not-the-right-password" not in text


def test_doctor_with_a_missing_secret_fails_naming_the_reference(lab, prefect_harness,
                                                                 tmp_path: Path):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["repositories"][0]["password"] = "env:LABKEEPER_TEST_UNSET_VARIABLE"
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    state = doctor_flow(lab=str(path), return_state=True)
    assert state.is_failed()
    _run, logs, _arts = _flow_run_record(state)
    assert "env:LABKEEPER_TEST_UNSET_VARIABLE" in "\n".join(log.message for log in logs)


def test_doctor_with_an_unknown_ssh_host_key_fails_the_ssh_check(lab, prefect_harness,
                                                                 tmp_path: Path):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    inv["ssh"]["known_hosts"] = str(empty)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    state = doctor_flow(lab=str(path), return_state=True)
    assert state.is_failed()
    assert "ssh:labhost" in state.message


@pytest.mark.parametrize("exc_kind", ["transient", "permanent"])
def test_tasks_retry_transient_errors_only(prefect_harness, exc_kind):
    from prefect import flow, task

    from labkeeper.errors import PermanentError, TransientError
    from tasks.common import RETRY

    calls: list[int] = []
    policy = {**RETRY, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(timeout_seconds=10, **policy)
    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise (TransientError if exc_kind == "transient" else PermanentError)("boom")
        return "done"

    @flow
    def wrapper() -> str:
        return flaky()

    state = wrapper(return_state=True)
    if exc_kind == "transient":
        assert state.is_completed() and len(calls) == 3
    else:
        assert state.is_failed() and len(calls) == 1


def test_doctor_command_prints_the_table_and_exits_nonzero_on_failure(lab, prefect_harness,
                                                                      tmp_path: Path):
    from typer.testing import CliRunner

    from cli.main import app

    ok = CliRunner().invoke(app, ["doctor", "--lab", str(lab.inventory_path), "--json"])
    assert ok.exit_code == 0, ok.output
    rows = json.loads(ok.stdout[ok.stdout.index("["):])
    assert {r["check"] for r in rows} == {"proxmox", "ssh", "database", "repository", "bucket",
                                          "restic"}

    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["databases"][0]["dbname"] = "no_such_database"
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    bad = CliRunner().invoke(app, ["doctor", "--lab", str(path), "--json"])
    assert bad.exit_code == 1
    rows = json.loads(bad.stdout[bad.stdout.index("["):bad.stdout.rindex("]") + 1])
    assert [r["status"] for r in rows if r["target"] == "appdb"] == ["fail"]


def test_flow_hooks_ping_start_and_fail_and_notify_on_failure(lab, prefect_harness, receiver,
                                                              tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LK_HOOK_APPRISE", f"json://127.0.0.1:{receiver.port}/notify")
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["databases"][0]["dbname"] = "no_such_database"
    inv["notifications"] = {"apprise": ["env:LK_HOOK_APPRISE"], "on": ["failure"],
                            "healthchecks": {"base_url": f"{receiver.url}/ping",
                                             "pings": {"doctor": "env:LK_HOOK_PING"}}}
    monkeypatch.setenv("LK_HOOK_PING", "doctor-check-id")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    state = doctor_flow(lab=str(path), return_state=True)
    assert state.is_failed()
    paths = [r.path for r in receiver.requests]
    assert paths[0] == "/ping/doctor-check-id/start"
    assert "/ping/doctor-check-id/fail" in paths
    note = next(r for r in receiver.requests if r.path == "/notify")
    body = json.loads(note.body)
    assert "doctor" in body["title"] and "database:appdb" in body["message"]


def test_flow_hooks_ping_success_on_a_healthy_run(lab, prefect_harness, receiver,
                                                  tmp_path: Path, monkeypatch):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    inv["notifications"] = {"healthchecks": {"base_url": f"{receiver.url}/ping",
                                             "pings": {"doctor": "env:LK_HOOK_PING"}}}
    monkeypatch.setenv("LK_HOOK_PING", "doctor-check-id")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    assert doctor_flow(lab=str(path), return_state=True).is_completed()
    assert [r.path for r in receiver.requests] == ["/ping/doctor-check-id/start",
                                                   "/ping/doctor-check-id"]
