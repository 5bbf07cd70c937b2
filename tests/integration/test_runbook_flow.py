"""Runbooks end to end against the local lab (real PostgreSQL, restic on moto S3, sshd)
on a temporary Prefect server: restore-database (approved up front, approved and
rejected from the command line), the engine's on_failure policies, approval timeouts,
arguments that stay one argument over SSH, and dry runs that change nothing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app as cli_app
from flows.runbook import runbook_flow
from labkeeper import pg_backup
from labkeeper.inventory import load_inventory
from tests.integration.test_doctor_flow import _flow_run_record

pytestmark = pytest.mark.integration

DB = "rbdb"


def lab_copy(lab: Any, path: Path, *, keep: tuple[str, ...] = ()) -> Path:
    """The lab inventory with only database ``rbdb`` (and the demo sections in ``keep``)."""
    inv = yaml.safe_load(lab.inventory_path.read_text())
    for demo_only in ("guests", "roles", "apps", "vzdump_jobs", "path_backups"):
        if demo_only not in keep:
            inv.pop(demo_only, None)
    base = next(d for d in inv["databases"] if d["name"] == "appdb")
    inv["databases"] = [{**base, "name": DB, "dbname": DB,
                         "drill": {**base["drill"], "smoke_queries": []}}]
    inv["settings"]["state_dir"] = str(path.parent / "state")
    inv["settings"]["tuning"] = {"approval_poll": 1}  # approvals answered within a second
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def rows_in(lab: Any, db: str) -> int:
    return int(lab.postgres.psql_super("SELECT count(*) FROM items;", db=db).strip())


def databases_like(lab: Any, pattern: str) -> list[str]:
    out = lab.postgres.psql_super(
        f"SELECT datname FROM pg_database WHERE datname LIKE '{pattern}' ORDER BY 1;")
    return [x.strip() for x in out.splitlines() if x.strip()]


def drop(lab: Any, names: list[str]) -> None:
    for n in names:
        lab.postgres.psql_super(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE);')


@pytest.fixture(scope="module")
def rb_lab(lab, tmp_path_factory, prefect_harness):
    """Database rbdb (100 rows, owned by the lab role) backed up once; the inventory."""
    pg = lab.postgres
    pg.psql_super(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE);")
    pg.psql_super(f"CREATE DATABASE {DB} OWNER {pg.app_user};")
    pg.psql_super(f"SET ROLE {pg.app_user};\nCREATE TABLE items (id int PRIMARY KEY, v text);\n"
                  "INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;",
                  db=DB)
    path = lab_copy(lab, tmp_path_factory.mktemp("rb") / "lab.yaml")
    inv = load_inventory(path)
    result = pg_backup.backup_database(inv, DB)
    assert result.snapshot_id
    yield path
    drop(lab, [DB, *databases_like(lab, f"{DB}\\_%")])


def _artifacts(state: Any) -> dict[str, Any]:
    _run, _logs, arts = _flow_run_record(state)
    return {a.key: a for a in arts}


def _task_runs(state: Any) -> list[Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    return asyncio.run(read())


def _paused_run(name_hint: float, timeout: float = 60) -> str:
    """The id of the runbook flow run that is Paused (started after ``name_hint``)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    async def read() -> list[Any]:
        async with get_client() as client:
            return await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in asyncio.run(read())
                if r.start_time and r.start_time.timestamp() >= name_hint - 1]
        if runs:
            return str(runs[0].id)
        time.sleep(0.5)
    raise AssertionError("no runbook run paused for approval")


def _run_in_thread(**kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def target() -> None:
        box["state"] = runbook_flow(**kwargs, return_state=True)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


# ------------------------------------------------------------------ restore-database


def test_restore_database_with_yes_swaps_in_the_verified_copy_and_keeps_the_original(
        rb_lab, lab):
    lab.postgres.psql_super("INSERT INTO items VALUES (1001, 'after the backup');", db=DB)
    assert rows_in(lab, DB) == 101
    state = runbook_flow(name="restore-database", params={"database": DB}, yes=True,
                         lab=str(rb_lab), return_state=True)
    assert state.is_completed(), state.message
    assert rows_in(lab, DB) == 100  # the backup's data is back in place
    aside = databases_like(lab, f"{DB}\\_before\\_%")
    assert len(aside) == 1 and rows_in(lab, aside[0]) == 101  # the original, kept aside
    assert not databases_like(lab, f"{DB}\\_restored\\_%")
    statuses = {r["step"]: r["status"] for r in state.result()}
    assert statuses == {"restore": "ok", "approve-swap": "ok", "swap": "ok", "answers": "ok",
                        "done": "ok"}
    arts = _artifacts(state)
    md = arts["runbook-restore-database"].data
    assert "| ✅ | swap | database |" in md and f"`database` = `{DB}`" in md
    assert "approved up front" in md and aside[0] in md
    names = {t.name for t in _task_runs(state)}
    assert {"swap", "answers"} <= names  # each step its own task run
    drop(lab, aside)


def test_restore_database_waits_for_approval_and_cli_approve_lets_it_finish(rb_lab, lab):
    started = time.time()
    t, box = _run_in_thread(name="restore-database", params={"database": DB},
                            lab=str(rb_lab))
    run_id = _paused_run(started)
    restored = databases_like(lab, f"{DB}\\_restored\\_%")
    assert len(restored) == 1  # restored and verified before the approval
    res = CliRunner().invoke(cli_app, ["runbook", "approve", run_id, "--comment", "go"])
    assert res.exit_code == 0, res.output
    t.join(120)
    state = box["state"]
    assert state.is_completed(), state.message
    approval = next(r for r in state.result() if r["step"] == "approve-swap")
    assert approval["status"] == "ok" and "(go)" in approval["detail"]
    assert len(databases_like(lab, f"{DB}\\_before\\_%")) == 1
    drop(lab, databases_like(lab, f"{DB}\\_before\\_%"))


def test_a_rejected_approval_cancels_the_run_and_drops_the_restored_copy(rb_lab, lab):
    lab.postgres.psql_super("INSERT INTO items VALUES (2002, 'keep me');", db=DB)
    started = time.time()
    t, box = _run_in_thread(name="restore-database", params={"database": DB},
                            lab=str(rb_lab))
    run_id = _paused_run(started)
    res = CliRunner().invoke(cli_app, ["runbook", "approve", run_id, "--reject"])
    assert res.exit_code == 0, res.output
    t.join(120)
    state = box["state"]
    assert state.is_cancelled(), state
    assert "cancelled by operator" in state.message
    assert not databases_like(lab, f"{DB}\\_restored\\_%")  # compensation dropped it
    assert rows_in(lab, DB) == 101  # the original untouched
    lab.postgres.psql_super("DELETE FROM items WHERE id = 2002;", db=DB)


def test_dry_run_checks_references_and_changes_nothing(rb_lab, lab):
    before = databases_like(lab, f"{DB}%")
    state = runbook_flow(name="restore-database", params={"database": DB}, dry_run=True,
                         lab=str(rb_lab), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert {r["status"] for r in rows} == {"planned"}
    assert "backup " in rows[0]["detail"] and "<restore.restored>" in rows[2]["title"]
    assert databases_like(lab, f"{DB}%") == before
    bad = runbook_flow(name="restore-database", params={"database": DB,
                                                        "snapshot": "deadbeef"},
                       dry_run=True, lab=str(rb_lab), return_state=True)
    assert bad.is_failed()
    assert "snapshot 'deadbeef' is not a complete backup" in bad.message


def test_bad_parameters_fail_before_any_step_naming_the_parameter(rb_lab):
    res = CliRunner().invoke(cli_app, ["runbook", "run", "restore-database", "--lab",
                                       str(rb_lab), "--param", "database=nope"])
    assert res.exit_code == 2
    assert "parameter database: no database 'nope'" in " ".join(res.output.split())


# ------------------------------------------------------------------ the engine


ENGINE = """
version: 1
name: {name}
description: engine test
params:
  text: {{type: string, default: "x"}}
  marker: {{type: string, default: "/nonexistent"}}
steps:
{steps}
compensations:
  - id: undo
    ssh: {{host: labhost, argv: [rm, -f, "{{{{ marker }}}}"]}}
"""


@pytest.fixture
def own_runbooks(tmp_path, monkeypatch):
    d = tmp_path / "runbooks"
    d.mkdir()
    monkeypatch.setenv("LABKEEPER_RUNBOOKS", str(d))

    def write(name: str, steps: str) -> str:
        (d / f"{name}.yaml").write_text(ENGINE.format(name=name, steps=steps))
        return name

    return write


def test_a_parameter_with_shell_metacharacters_reaches_the_remote_command_as_one_argument(
        rb_lab, own_runbooks, tmp_path):
    marker = tmp_path / "pwned"
    nasty = f"a b; touch {marker}; $(touch {marker}) `touch {marker}` 'q\" | cat"
    name = own_runbooks("echo", """
  - id: say
    ssh: {host: labhost, argv: [printf, "%s", "{{ text }}"]}
  - id: show
    note: "{{ steps.say.stdout }}"
""")
    state = runbook_flow(name=name, params={"text": nasty}, lab=str(rb_lab),
                         return_state=True)
    assert state.is_completed(), state.message
    show = next(r for r in state.result() if r["step"] == "show")
    assert show["detail"] == nasty
    assert not marker.exists()


def test_on_failure_continue_goes_on_and_compensate_undoes_then_names_what_was_done(
        rb_lab, own_runbooks, tmp_path):
    marker = tmp_path / "made-by-step-two"
    name = own_runbooks("faults", """
  - id: optional
    ssh: {host: labhost, argv: ["false"]}
    on_failure: continue
  - id: make
    ssh: {host: labhost, argv: [touch, "{{ marker }}"]}
  - id: breaks
    ssh: {host: labhost, argv: [sh, -c, "echo broken >&2; exit 4"]}
    on_failure: {compensate: [undo]}
  - id: never
    note: not reached
""")
    state = runbook_flow(name=name, params={"marker": str(marker)}, lab=str(rb_lab),
                         return_state=True)
    assert state.is_failed()
    msg = state.message
    assert "step breaks failed" in msg and "exited 4" in msg and "broken" in msg
    assert "already done: make" in msg and "compensation: undo ok" in msg
    assert not marker.exists()  # the compensation removed it
    _run, _logs, arts = _flow_run_record(state)
    table = arts[[a.key for a in arts].index("runbook-faults-steps")]
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [(r["step"], r["status"]) for r in data] == [
        ("optional", "failed"), ("make", "ok"), ("breaks", "failed"), ("undo", "ok")]


def test_drop_and_swap_refuse_a_copy_this_run_did_not_make_even_with_a_labkeeper_name(
        rb_lab, own_runbooks, lab):
    other = f"{DB}_restored_20200101000000"  # another run's copy, or a person's database
    drop(lab, [other])
    lab.postgres.psql_super(f"CREATE DATABASE {other} OWNER {lab.postgres.app_user};")
    try:
        name = own_runbooks("strangers", f"""
  - id: drop-other
    database: {{op: drop, database: {DB}, name: {other}}}
    on_failure: continue
  - id: swap-other
    database: {{op: swap, database: {DB}, restored: {other}}}
""")
        state = runbook_flow(name=name, lab=str(rb_lab), return_state=True)
        assert state.is_failed()
        _run, _logs, arts = _flow_run_record(state)
        table = arts[[a.key for a in arts].index("runbook-strangers-steps")]
        data = json.loads(table.data) if isinstance(table.data, str) else table.data
        detail = {r["step"]: (r["status"], r["detail"]) for r in data}
        for step, field in (("drop-other", "name"), ("swap-other", "restored")):
            assert detail[step][0] == "failed"
            assert f"{field}: '{other}' was not created for database {DB} by this run" in \
                detail[step][1]
        assert databases_like(lab, other) == [other]  # neither dropped nor swapped in
    finally:
        drop(lab, [other])


def test_an_approval_nobody_answers_times_out_and_fails_the_run(rb_lab, own_runbooks):
    name = own_runbooks("waits", """
  - id: ask
    approval: {message: "anyone?", timeout: 2}
  - id: after
    note: not reached
""")
    state = runbook_flow(name=name, lab=str(rb_lab), return_state=True)
    assert state.is_failed()
    # Prefect's server words the final state of a timed-out pause itself ("failed and
    # never resumed"); our error is in the run's log and artifact.
    _run, logs, arts = _flow_run_record(state)
    assert any("step ask failed: no approval within 2" in log.message for log in logs)
    md = next(a for a in arts if a.key == "runbook-waits").data
    assert "| ❌ | ask | approval |" in md and "after" not in md.split("## Steps")[1]


def test_an_invalid_runbook_file_is_listed_with_file_line_and_field(own_runbooks, tmp_path):
    d = Path(own_runbooks("fine", "  - id: a\n    note: hi\n")).parent
    bad = tmp_path / "runbooks" / "broken.yaml"
    bad.write_text("version: 1\nname: broken\ndescription: x\nsteps:\n  - id: a\n"
                   "    approval: {mesage: hi}\n")
    res = CliRunner().invoke(cli_app, ["runbook", "list"])
    assert res.exit_code == 1
    flat = res.output.replace("\n", "")
    assert f"{bad}:6 steps[0].approval.mesage: unknown key 'mesage'" in flat
    assert f"{bad}:6 steps[0].approval.message: required field is missing" in flat
    assert "fine" in res.output and d is not None


def test_a_runbook_run_leaks_no_secret_into_logs_parameters_artifacts_or_argv(rb_lab, lab):
    from datetime import UTC, datetime

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        LogFilter,
        LogFilterTimestamp,
    )

    from tests.integration.test_doctor_flow import ArgvWatcher, _lab_secret_values

    secrets = _lab_secret_values(lab)
    since = datetime.now(tz=UTC)
    with ArgvWatcher() as watcher:
        state = runbook_flow(name="restore-database", params={"database": DB}, yes=True,
                             lab=str(rb_lab), return_state=True)
    assert state.is_completed(), state.message
    run, _logs, _arts = _flow_run_record(state)

    async def everything() -> tuple[list[Any], list[Any]]:
        async with get_client() as client:  # the run and its subflow runs
            logs = await client.read_logs(log_filter=LogFilter(
                timestamp=LogFilterTimestamp(after_=since)))
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter())
            return logs, arts

    logs, arts = asyncio.run(everything())
    assert any("restore" in log.message for log in logs)
    assert any(b"restic" in c for c in watcher.seen), "the watcher saw no child process"
    haystacks = {"parameters": repr(run.parameters),
                 "logs": "\n".join(log.message for log in logs),
                 "artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in arts)}
    for secret in secrets:
        for where, text in haystacks.items():
            assert secret not in text, f"a lab secret leaked into the {where}"
        for cmdline in watcher.seen:
            assert secret.encode() not in cmdline, "a lab secret leaked into a child's argv"
    drop(lab, databases_like(lab, f"{DB}\\_before\\_%"))
