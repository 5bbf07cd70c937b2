"""The dr_drill flow on a real (temporary) Prefect server: artifacts, events, metrics,
and a breached objective failing the run."""

from __future__ import annotations

import json

import pytest
import yaml

from cli.jobs import run_drill_cli
from flows.dr_drill import DrillRunFailed, dr_drill_flow
from labkeeper import metrics
from tests.integration.test_doctor_flow import _flow_run_record
from tests.integration.test_drill_support import load, scratch_databases
from tests.integration.test_pg_backup import _events

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flow_lab(backed_up):
    _e, path, _pw = backed_up
    return path


def test_drill_run_of_all_passes_with_artifacts_events_and_metrics(flow_lab, lab,
                                                                   prefect_harness):
    state = dr_drill_flow(target="all", lab=str(flow_lab), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [(r["drill"], r["target"], r["status"]) for r in rows] == [
        ("database", "appdb", "passed")]
    assert not scratch_databases(lab)
    _run, _logs, arts = _flow_run_record(state)
    by_key = {a.key: a for a in arts}
    md = by_key["dr-drill"]
    assert md.type == "markdown"
    assert "✅ table public.users: 500 rows" in md.data and "RPO" in md.data
    table = by_key["drill-db-appdb"]
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert data[0]["status"] == "passed" and data[0]["rto objective"] == "30.0 min"
    events = _events("labkeeper.drill.passed", "/appdb")
    assert events and events[0]["payload"]["target"] == "appdb"
    recorded = {(s.name, s.labels["target"]): s.value
                for s in metrics.Store(load(flow_lab).settings.state_dir).samples()}
    assert recorded[("labkeeper_drill_success", "appdb")] == 1
    assert 0 < recorded[("labkeeper_drill_rto_seconds", "appdb")] < 60
    assert "labkeeper_drill_rpo_seconds" in {k[0] for k in recorded}


def test_a_breached_objective_fails_the_run_and_emits_objective_breached(
        flow_lab, tmp_path, capsys, prefect_harness):
    inv = yaml.safe_load(flow_lab.read_text())
    inv["databases"][0]["drill"]["rto_minutes"] = 0.0001
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    state = dr_drill_flow(target="db:appdb", lab=str(path), return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, DrillRunFailed)
    assert exc.rows[0]["status"] == "failed" and "RTO" in exc.rows[0]["detail"]
    assert "1 of 1 drills failed: database:appdb" in state.message
    events = _events("labkeeper.drill.objective_breached", "/appdb")
    assert events and events[0]["payload"]["breaches"][0].startswith("RTO ")
    assert _events("labkeeper.drill.failed", "/appdb")
    # the CLI entry point: same flow, exit code 1 and the table printed
    assert run_drill_cli(path, "appdb") == 1
    out = capsys.readouterr().out
    assert "DR drills" in out and "failed" in out and "RTO" in out
