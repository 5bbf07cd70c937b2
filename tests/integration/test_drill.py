"""Database DR drills against the real local lab: real restic (our own moto bucket),
real psql restores into scratch databases of the lab's PostgreSQL, forged faults."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from labkeeper import drill, pg_backup
from labkeeper.inventory import Inventory
from tests.integration.test_drill_support import (
    DrillEnv,
    drill_spec,
    forge_backup,
    load,
    scratch_databases,
    with_drill,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def env(backed_up) -> tuple[DrillEnv, Inventory]:
    e, path, _pw = backed_up
    return e, load(path)


@pytest.fixture
def no_leftovers(lab) -> Iterator[None]:
    before = set(scratch_databases(lab))
    yield
    assert set(scratch_databases(lab)) == before, "a scratch database was left behind"


def _failed(result: drill.DrillResult) -> dict[str, str]:
    return {c.name: c.detail for c in result.failed_checks}


@pytest.mark.restic_matrix
def test_good_backup_passes_with_every_table_smoke_query_and_globals_verified(
        env, no_leftovers, caplog):
    _e, inv = env
    caplog.set_level(logging.INFO, logger="labkeeper")
    result = drill.database_drill(inv, "appdb")
    logs = caplog.messages
    assert result.passed, result.summary()
    checks = {c.name: c for c in result.checks}
    assert checks["table public.users"].detail == "500 rows"
    assert checks["table public.audit_log"].detail == "20000 rows"
    assert checks["smoke users exist"].ok and "returned 500" in checks["smoke users exist"].detail
    assert checks["smoke first user"].ok
    assert checks["globals"].ok and "complete" in checks["globals"].detail
    assert checks["dump size"].ok and checks["restore errors"].ok
    assert checks["rto"].ok and checks["rpo"].ok
    assert 0 < result.rpo_s < 3600 and 0 < result.rto_s < 60
    assert result.scratch.startswith("labkeeper_drill_appdb_")
    assert f"scratch database {result.scratch} dropped" in result.notes
    assert not result.kept
    assert any("PASSED" in line for line in logs)


def test_manifest_row_count_mismatch_and_a_missing_table_fail_the_drill(env, tmp_path,
                                                                       no_leftovers):
    _e, inv = env

    def off_by_one_and_a_ghost(m: pg_backup.Manifest) -> pg_backup.Manifest:
        tables = [t.model_copy(update={"rows": t.rows + 1}) if t.name == "users" else t
                  for t in m.tables]
        ghost = pg_backup.TableCount(schema_name="public", name="ghosts", rows=3)
        return m.model_copy(update={"tables": [*tables, ghost]})

    forge_backup(inv, "fault-count", tmp_path, edit=off_by_one_and_a_ghost)
    result = drill.database_drill(inv, "fault-count")
    assert not result.passed
    assert _failed(result) == {
        "table public.users": "500 rows restored, manifest says 501",
        "table public.ghosts": "missing from the restore (manifest: 3 rows)"}
    assert "manifest says 501" in result.summary()


@pytest.mark.restic_matrix
def test_truncated_dump_fails_before_psql_gets_end_of_stream_and_scratch_is_dropped(
        env, tmp_path, no_leftovers):
    _e, inv = env
    forged = forge_backup(inv, "fault-trunc", tmp_path, truncate_to=1_500_000)
    assert forged.dump is not None and forged.dump.bytes == 1_500_000  # the size "matches"
    result = drill.database_drill(inv, "fault-trunc")
    assert not result.passed
    assert "is incomplete" in result.error
    assert "dump complete' line is missing" in result.error
    assert result.scratch and not result.kept
    assert f"scratch database {result.scratch} dropped" in result.notes


def test_keep_on_failure_keeps_the_scratch_database_and_says_where(env, tmp_path, lab):
    _e, inv = env
    forge_backup(inv, "fault-trunc-kept", tmp_path, truncate_to=800_000)
    inv = with_drill(inv, "fault-trunc-kept", keep_on_failure=True)
    result = drill.database_drill(inv, "fault-trunc-kept")
    try:
        assert not result.passed
        assert result.scratch in scratch_databases(lab)
        assert result.kept.startswith(f"{result.scratch} on drill server lab-pg (127.0.0.1:")
        assert any("kept for inspection" in n and "DROP DATABASE" in n for n in result.notes)
    finally:
        lab.postgres.psql_super(drill.drop_db_sql(result.scratch))


def test_stale_latest_backup_breaches_the_rpo_objective(env, no_leftovers):
    _e, inv = env
    result = drill.database_drill(with_drill(inv, "appdb", rpo_hours=0.0001), "appdb")
    assert not result.passed and result.rpo_breached and not result.rto_breached
    assert result.breaches and result.breaches[0].startswith("RPO ")
    assert set(_failed(result)) == {"rpo"}


def test_restore_slower_than_its_objective_breaches_the_rto(env, no_leftovers):
    _e, inv = env
    result = drill.database_drill(with_drill(inv, "appdb", rto_minutes=0.0001), "appdb")
    assert not result.passed and result.rto_breached and not result.rpo_breached
    assert set(_failed(result)) == {"rto"}
    assert "objective 0.0 s" in result.summary()


def test_a_smoke_query_that_is_not_satisfied_fails_the_drill(env, no_leftovers):
    _e, inv = env
    smoke = [inv.database("appdb").drill.smoke_queries[0].model_copy(update={"min": 10_000})]
    result = drill.database_drill(with_drill(inv, "appdb", smoke_queries=smoke), "appdb")
    assert _failed(result) == {"smoke users exist":
                               "'SELECT count(*) FROM users' returned 500, expected ≥ 10000"}


def test_a_database_without_any_backup_fails_loudly(env, no_leftovers):
    _e, inv = env
    result = drill.database_drill(inv, "never-backed-up")
    assert not result.passed
    assert "no complete backup" in result.error and not result.scratch


# -- custom-format dumps (pg_dump -Fc) restore through pg_restore ---------------------------

@pytest.fixture(scope="module")
def custom(backed_up) -> Inventory:
    """The same bucket with ``appdb-custom``: the lab's appdb dumped with -Fc, backed up
    once; ``custom-trunc`` is a series for a forged truncated -Fc dump."""
    e, _path, pw = backed_up
    dbs = [{"name": "appdb-custom", "format": "custom", "globals": False,
            "drill": drill_spec()},
           {"name": "custom-trunc", "format": "custom", "globals": False,
            "drill": drill_spec(enabled=False)}]
    inv = load(e.inventory("drill-db", pw, databases=dbs,
                           drills={"repository": {"enabled": False}}))
    pg_backup.backup_database(inv, "appdb-custom")
    return inv


def test_custom_format_backup_restores_through_pg_restore_and_passes(custom, no_leftovers):
    result = drill.database_drill(custom, "appdb-custom")
    assert result.passed, result.summary()
    checks = {c.name: c for c in result.checks}
    assert checks["table public.users"].detail == "500 rows"
    assert checks["table public.audit_log"].detail == "20000 rows"
    assert checks["smoke first user"].ok and checks["restore errors"].ok
    assert checks["dump size"].ok
    repo = pg_backup.open_repo(custom, "lab-repo")
    backup = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1",
                                          name="appdb-custom")
    manifest = pg_backup.read_manifest(repo, backup)
    assert manifest.dump_format == "custom" and manifest.dump.path == "/appdb-custom.dump"
    assert "globals not taken for this server (globals: false)" in result.notes


def test_a_truncated_custom_format_dump_fails_the_drill_through_pg_restore(
        custom, tmp_path, no_leftovers):
    forged = forge_backup(custom, "custom-trunc", tmp_path, source="appdb-custom",
                          truncate_to=200_000)
    assert forged.dump_format == "custom" and forged.dump.path == "/custom-trunc.dump"
    result = drill.database_drill(custom, "custom-trunc")
    assert not result.passed
    failed = {c.name: c.detail for c in result.failed_checks}
    assert "unexpected" in failed["restore errors"]
    assert "pg_restore" in failed["restore errors"]
    assert any(name.startswith("table ") for name in failed), failed
