"""prefect.yaml declares the deployments; `labkeeper serve` reads it and, for the shipped
deployments, takes the schedules from the inventory."""

from __future__ import annotations

from pathlib import Path

from deployments.serve import (
    FROM_INVENTORY,
    declared,
    load_deployments,
    plan_schedules,
    schedule_table,
)
from labkeeper.inventory import load_inventory, parse_inventory

RUNBOOK_DEPLOYMENTS = {"restore-database", "restore-guest", "rollback-app", "add-new-service",
                       "pre-maintenance", "post-maintenance", "pitr-restore-database"}
ON_DEMAND = {"provision", "runbook", "update-apps",  # update-apps: until apps[].schedule
             "pitr-drill",  # scheduled inside weekly-dr-drill (pitr:<server> targets)
             *RUNBOOK_DEPLOYMENTS}


def test_every_scheduled_deployment_has_a_cron_with_a_time_zone():
    for d in declared():
        assert d["work_pool"]["name"] == "homelab"
        schedules = d.get("schedules") or []
        assert schedules or d["name"] in ON_DEMAND, f"{d['name']} has no schedule"
        assert all(s["cron"] and s["timezone"] for s in schedules)


def test_served_deployments_mirror_prefect_yaml():
    deps = {d.name: d for d in load_deployments()}
    for d in declared():
        dep = deps[d["name"]]
        schedules = d.get("schedules") or []
        assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in schedules]
        assert [s.schedule.timezone for s in dep.schedules] == [s["timezone"] for s in schedules]
        assert dep.entrypoint.endswith(d["entrypoint"].split(":")[1])


# -- schedules from the inventory ------------------------------------------------------

EXAMPLE = load_inventory(Path(__file__).resolve().parents[2] / "lab.example.yaml")


def _decl(name: str) -> dict:
    return next(d for d in declared() if d["name"] == name)


def _plan(name: str, inv) -> list[tuple[str, str, dict]]:
    return [(p.cron, p.timezone, p.parameters) for p in plan_schedules(_decl(name), inv)]


def test_every_shipped_scheduled_deployment_is_scheduled_from_the_inventory():
    names = {d["name"] for d in declared()}
    assert set(FROM_INVENTORY) <= names
    for name, (entrypoint, _) in FROM_INVENTORY.items():
        assert _decl(name)["entrypoint"] == entrypoint


def test_path_sets_on_different_schedules_get_one_schedule_each_selecting_them():
    assert _plan("nightly-path-backup", EXAMPLE) == [
        ("30 3 * * *", "Europe/Berlin", {"names": ["photos"]}),
        ("45 3 * * *", "Europe/Berlin", {"names": ["nextcloud-data"]}),
        ("0 3 * * *", "Europe/Berlin", {"names": ["compose-stacks"]}),
    ]


def test_databases_sharing_a_schedule_get_one_schedule_without_a_selection():
    inv = parse_inventory("""
version: 1
lab: {name: t, timezone: America/New_York}
repositories: [{name: r, url: /srv/restic, password: env:RP}]
databases:
  - {name: a, host: db1, schedule: "0 1 * * *"}
  - {name: b, host: db1, schedule: "0 1 * * *"}
""", "t.yaml")
    # no selection: a database added later is backed up without re-serving
    assert _plan("nightly-pg-backup", inv) == [("0 1 * * *", "America/New_York", {})]


def test_only_apps_with_a_schedule_are_updated_on_a_schedule_and_by_name():
    assert [a.name for a in EXAMPLE.apps if a.schedule is None]  # on demand only
    assert _plan("update-apps", EXAMPLE) == [("0 4 * * 6", "Europe/Berlin",
                                              {"apps": ["immich"]})]


def test_no_app_with_a_schedule_means_no_update_schedule():
    inv = parse_inventory("version: 1\nlab: {name: t}\n", "t.yaml")
    assert _plan("update-apps", inv) == []


def test_each_enabled_vzdump_job_runs_on_its_own_schedule():
    assert _plan("weekly-vzdump", EXAMPLE) == [
        ("30 1 * * 6", "Europe/Berlin", {"job": "weekly-all"}),
        ("15 1 * * *", "Europe/Berlin", {"job": "daily-critical"}),
    ]


def test_drills_run_all_on_the_default_schedule_unless_a_target_has_its_own():
    assert _plan("weekly-dr-drill", EXAMPLE) == [("0 5 * * 0", "Europe/Berlin",
                                                  {"target": "all"})]
    inv = parse_inventory("""
version: 1
lab: {name: t}
repositories: [{name: r, url: /srv/restic, password: env:RP}]
databases:
  - {name: a, host: db1, drill: {enabled: true, schedule: "0 6 * * 3"}}
  - {name: b, host: db1, drill: {enabled: true}}
drills: {schedule: "0 5 * * 0", repository: {enabled: false}}
""", "t.yaml")
    assert _plan("weekly-dr-drill", inv) == [("0 6 * * 3", "UTC", {"target": "db:a"}),
                                             ("0 5 * * 0", "UTC", {"target": "db:b"})]


def test_the_backup_watch_runs_on_the_missing_backup_schedule():
    assert _plan("backup-watch", EXAMPLE) == [("0 9 * * *", "Europe/Berlin", {})]


def test_without_an_inventory_and_for_other_deployments_prefect_yaml_counts():
    assert _plan("nightly-path-backup", None) == [("30 2 * * *", "UTC", {})]
    assert _plan("doctor", EXAMPLE) == [("30 6 * * *", "UTC", {})]
    assert _plan("provision", EXAMPLE) == []
    renamed = {**_decl("nightly-path-backup"), "name": "my-extra-path-backup"}
    assert [p.cron for p in plan_schedules(renamed, EXAMPLE)] == ["30 2 * * *"]


def test_served_deployments_carry_the_inventory_schedules_and_their_parameters():
    deps = {d.name: d for d in load_deployments(inv=EXAMPLE)}
    sched = deps["nightly-path-backup"].schedules
    assert [(s.schedule.cron, s.schedule.timezone, s.parameters) for s in sched] == [
        ("30 3 * * *", "Europe/Berlin", {"names": ["photos"]}),
        ("45 3 * * *", "Europe/Berlin", {"names": ["nextcloud-data"]}),
        ("0 3 * * *", "Europe/Berlin", {"names": ["compose-stacks"]}),
    ]
    assert deps["update-apps"].parameters == {"canary": True, "dry_run": False, "force": False}
    assert deps["provision"].schedules == []


def test_schedule_table_names_the_source_of_every_schedule():
    rows = schedule_table(EXAMPLE)
    assert {r["deployment"] for r in rows} == {d["name"] for d in declared()}
    assert {r["source"] for r in rows if r["deployment"] == "runbook"} == {"on demand"}
    assert all(r["source"].startswith("inventory") for r in rows
               if r["deployment"] in FROM_INVENTORY)


REQUIRED = {"nightly-pg-backup", "repo-maintenance", "weekly-vzdump", "weekly-dr-drill",
            "update-apps", "provision", "runbook", "doctor", "backup-watch"}


def test_prefect_yaml_declares_every_required_deployment_with_entrypoint_tags_and_parameters():
    root = Path(__file__).resolve().parents[2]
    decl = {d["name"]: d for d in declared()}
    assert REQUIRED <= set(decl), REQUIRED - set(decl)
    for d in decl.values():
        file, _, func = d["entrypoint"].partition(":")
        assert file.startswith("flows/") and (root / file).is_file() and func
        assert "labkeeper" in d["tags"]
        assert isinstance(d.get("parameters"), dict)


MINIMAL = """
version: 1
lab: {name: t}
ssh: {user: root, key: env:K}
hosts: [{name: nas, address: 10.0.0.5}]
repositories: [{name: r, url: /srv/restic, password: env:RP}]
databases: [{name: a, host: db1, drill: {enabled: true}}]
path_backups: [{name: p, host: nas, paths: [/srv]}]
"""
"""A small inventory with a drill-enabled database and a path set (also used by
test_serve_path_drills)."""


def test_prefect_yaml_crons_are_the_inventory_defaults_so_deploy_alone_agrees():
    inv = parse_inventory(MINIMAL + "apps: []\n", "t.yaml")
    for name in ("nightly-pg-backup", "nightly-path-backup", "repo-maintenance",
                 "weekly-dr-drill", "backup-watch", "update-apps"):
        from_yaml = [(s["cron"], s["timezone"]) for s in _decl(name).get("schedules") or []]
        assert [(c, tz) for c, tz, _ in _plan(name, inv)] == from_yaml, name
