"""Pure parts of the DR drills: names, classification, comparison, plans, results."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.dr_drill import artifact_key
from labkeeper import drill
from labkeeper.errors import ConfigError
from labkeeper.inventory import SmokeQuery, load_inventory
from labkeeper.pg_backup import TableCount

EXAMPLE = Path(__file__).resolve().parents[2] / "lab.example.yaml"


def test_scratch_names_carry_the_reserved_prefix_a_random_part_and_fit_63_bytes():
    a, b = drill.scratch_db_name("immich"), drill.scratch_db_name("immich")
    assert a != b and a.startswith("labkeeper_drill_immich_")
    assert drill.scratch_db_name("Web-App.v2", token="abcd") == "labkeeper_drill_web_app_v2_abcd"
    long = drill.scratch_db_name("x" * 80, token="0123abcd")
    assert len(long) == 63 and long.endswith("_0123abcd") and drill.is_scratch_db(long)


@pytest.mark.parametrize("name", ["immich", "postgres", "labkeeper_drilled", "Labkeeper_drill_x",
                                  'labkeeper_drill_x"; DROP DATABASE y; --'])
def test_only_drill_scratch_databases_can_ever_be_dropped_or_created(name):
    with pytest.raises(ValueError, match="refusing"):
        drill.drop_db_sql(name)
    with pytest.raises(ValueError, match="refusing"):
        drill.create_db_sql(name)


def test_drop_sql_is_quoted_and_forced():
    assert drill.drop_db_sql("labkeeper_drill_a_1234") == \
        'DROP DATABASE IF EXISTS "labkeeper_drill_a_1234" WITH (FORCE);'


def test_restore_errors_about_missing_roles_are_expected_others_are_not():
    stderr = "\n".join([
        'psql:<stdin>:30: ERROR:  role "immich_owner" does not exist',
        'psql:<stdin>:31: ERROR:  must be member of role "app"',
        "psql:<stdin>:90: ERROR:  relation \"users\" already exists",
        "psql:<stdin>:95: NOTICE:  something harmless",
        "pg_restore: warning: errors ignored on restore: 2",
    ])
    expected, unexpected = drill.restore_errors(stderr)
    assert len(expected) == 2
    assert unexpected == ['psql:<stdin>:90: ERROR:  relation "users" already exists']


def test_tables_must_match_the_manifest_exactly():
    manifest = [TableCount(schema_name="public", name="users", rows=5),
                TableCount(schema_name="public", name="gone", rows=1),
                TableCount(schema_name="s", name="t", rows=0)]
    restored = {("public", "users"): 4, ("s", "t"): 0, ("public", "extra"): 9}
    checks = {c.name: (c.ok, c.detail) for c in drill.compare_tables(manifest, restored)}
    assert checks == {
        "table public.users": (False, "4 rows restored, manifest says 5"),
        "table public.gone": (False, "missing from the restore (manifest: 1 rows)"),
        "table s.t": (True, "0 rows"),
        "table public.extra": (False, "restored but not in the manifest"),
    }


@pytest.mark.parametrize(("query", "rows", "ok"), [
    (SmokeQuery(sql="q", min=1), [["3"]], True),
    (SmokeQuery(sql="q", min=1), [["0"]], False),
    (SmokeQuery(sql="q", max=2), [["3"]], False),
    (SmokeQuery(sql="q", equals=1), [["1"]], True),
    (SmokeQuery(sql="q", equals="t"), [["f"]], False),
    (SmokeQuery(sql="q", min=1), [["x"]], False),
    (SmokeQuery(sql="q", min=1), [], False),
    (SmokeQuery(sql="q", min=1), [["1", "2"]], False),
])
def test_smoke_queries_are_judged_by_min_max_equals(query, rows, ok):
    assert drill.judge_smoke(query, rows)[0] is ok


def test_read_data_subset_rotates_over_the_period():
    seq, last = [], None
    for _ in range(5):
        last = drill.next_subset(last, 3)
        seq.append(last)
    assert seq == [1, 2, 3, 1, 2]
    assert drill.next_subset(7, 3) == 1  # the period shrank
    with pytest.raises(ValueError):
        drill.next_subset(None, 0)


def test_network_is_detached_or_moved_to_the_isolated_bridge():
    config = {"net0": "name=eth0,bridge=vmbr0,tag=20,ip=dhcp", "net1": "virtio=AA,bridge=vmbr1",
              "memory": 512, "netx": "ignored"}
    assert drill.isolate_network(config, None) == ({}, ["net0", "net1"])
    options, delete = drill.isolate_network(config, "vmbr99")
    assert delete == []
    assert options == {"net0": "name=eth0,ip=dhcp,bridge=vmbr99",
                       "net1": "virtio=AA,bridge=vmbr99"}


def test_scratch_vmid_is_the_first_unused_of_the_range():
    assert drill.pick_scratch_vmid(9900, 9905, {9900, 9901, 100}) == 9902
    with pytest.raises(ConfigError, match="no free VMID"):
        drill.pick_scratch_vmid(9900, 9901, {9900, 9901})


def test_plan_targets_all_and_named_targets():
    inv = load_inventory(EXAMPLE)
    assert drill.plan_targets(inv, "all") == [
        ("database", "immich"), ("database", "nextcloud"), ("guest", "db1"),
        ("guest", "vaultwarden"), ("repository", "b2-main")]
    assert drill.plan_targets(inv, "db:immich") == [("database", "immich")]
    assert drill.plan_targets(inv, "guest:110") == [("guest", "db1")]
    assert drill.plan_targets(inv, "repository") == [("repository", "b2-main")]
    assert drill.plan_targets(inv, "proxy") == [("guest", "proxy")]


@pytest.mark.parametrize(("target", "message"), [
    ("immich", "names several things"),
    ("nope", "no database, guest or repository called 'nope'"),
    ("disk:immich", "unknown drill kind"),
    ("db:nope", "no database 'nope'"),
])
def test_bad_or_ambiguous_targets_are_refused_with_a_hint(target, message):
    with pytest.raises(ConfigError, match=message):
        drill.plan_targets(load_inventory(EXAMPLE), target)


def test_a_result_fails_on_a_failed_check_an_error_or_a_breached_objective():
    r = drill.DrillResult("database", "immich", started_at=datetime(2026, 1, 1, tzinfo=UTC),
                          rpo_objective_s=3600, rto_objective_s=60)
    r.check("table public.users", True, "5 rows")
    r.rpo_s, r.rto_s = 10.0, 5.0
    assert r.passed and r.status == "passed" and r.summary() == "1 check(s) passed"
    r.rto_s = 61.0
    assert not r.passed and r.breaches == ["RTO 61.0 s > objective 60.0 s"]
    r.rto_s = 5.0
    r.check("smoke 1", False, "returned 0")
    assert r.summary() == "smoke 1: returned 0"
    r.fail("boom", transient=True)
    assert r.transient and r.row()["detail"].startswith("boom; smoke 1")
    assert r.row()["checks"] == "1/2" and r.row()["rpo"] == "10.0 s"


def test_artifact_keys_are_lowercase_dashes_only():
    assert artifact_key("database", "Web_App.v2") == "drill-db-web-app-v2"
    assert artifact_key("repository", "b2-main") == "drill-repo-b2-main"
