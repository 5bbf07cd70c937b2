"""A runbook's own deployment (issue 21): the Run form's parameters reach the runbook
through a worker, as the UI's Run button sends them."""

from __future__ import annotations

import pytest

from tests.e2e.test_deployments import _client_call, _run_deployment

pytestmark = pytest.mark.e2e


def test_the_restore_database_deployment_runs_the_runbook_with_its_form_parameters(
        prefect_stack):
    backup = _run_deployment(prefect_stack, "pg_backup/nightly-pg-backup",
                             {"databases": ["appdb"]})
    assert backup.state.is_completed(), backup.state.message  # something to restore
    run = _run_deployment(prefect_stack, "runbook/restore-database",
                          {"database": "appdb", "dry_run": True})
    assert run.state.is_completed(), run.state.message
    assert run.parameters["database"] == "appdb"

    async def read(client):
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        return await client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))

    arts = {a.key: a for a in _client_call(prefect_stack, read)}
    record = arts["runbook-restore-database"].data
    assert "appdb" in record and "planned" in record
