"""Sites (issue 20): where each job runs, and the deployments/queues that follow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from deployments.serve import declared, place, placement_table
from labkeeper.errors import ConfigError
from labkeeper.inventory import parse_inventory

EXAMPLE = Path(__file__).resolve().parents[2] / "lab.example.yaml"


def _inv(edit: Any) -> Any:
    data = yaml.safe_load(EXAMPLE.read_text())
    edit(data)
    return parse_inventory(yaml.safe_dump(data))


def _sites(data: dict) -> None:
    data["settings"]["sites"] = {"core": {"work_queue": "pve"},
                                 "nas": {"deployments": ["backup-watch"]}}
    for ps in data["path_backups"]:
        if ps["name"] != "compose-stacks":
            ps["site"] = "nas"


def _decl(name: str) -> dict:
    return next(d for d in declared() if d["name"] == name)


def test_without_sites_every_deployment_stays_on_the_default_queue():
    inv = _inv(lambda d: None)
    rows = placement_table(inv)
    assert {r["work_queue"] for r in rows} == {"default"}
    assert len(rows) == len(declared())


def test_path_sets_on_two_sites_make_one_deployment_per_site_selecting_its_sets():
    inv = _inv(_sites)
    placed = {p.name: p for p in place(_decl("nightly-path-backup"), inv)}
    assert set(placed) == {"nightly-path-backup", "nightly-path-backup-nas"}
    core, nas = placed["nightly-path-backup"], placed["nightly-path-backup-nas"]
    assert (core.site, core.work_queue, core.parameters) == \
        ("core", "pve", {"names": ["compose-stacks"]})
    assert (nas.site, nas.work_queue) == ("nas", "nas")
    assert sorted(nas.parameters["names"]) == ["nextcloud-data", "photos"]
    # each copy schedules only its own sets
    assert {n for s in nas.schedules for n in s.parameters.get("names", [])} == \
        {"nextcloud-data", "photos"}
    assert all(s.parameters in ({}, {"names": ["compose-stacks"]}) for s in core.schedules)


def test_whole_lab_jobs_go_to_the_site_listing_them_else_the_default_site():
    inv = _inv(_sites)
    assert [(p.site, p.work_queue) for p in place(_decl("backup-watch"), inv)] == [("nas", "nas")]
    assert [(p.site, p.work_queue) for p in place(_decl("doctor"), inv)] == [("core", "pve")]
    # every database on the default site: one deployment, no selection
    [pg] = place(_decl("nightly-pg-backup"), inv)
    assert (pg.name, pg.work_queue, pg.parameters) == ("nightly-pg-backup", "pve", {})


def test_all_items_on_one_other_site_move_the_whole_deployment_there():
    def edit(data: dict) -> None:
        _sites(data)
        for db in data["databases"]:
            db["site"] = "nas"
    [pg] = place(_decl("nightly-pg-backup"), _inv(edit))
    assert (pg.name, pg.site, pg.work_queue, pg.parameters) == \
        ("nightly-pg-backup", "nas", "nas", {})


def test_an_unknown_site_is_an_inventory_error_naming_the_field():
    def edit(data: dict) -> None:
        _sites(data)
        data["databases"][0]["site"] = "attic"
    with pytest.raises(ConfigError) as err:
        _inv(edit)
    assert "databases[0].site: unknown site 'attic'" in str(err.value) + \
        "\n".join(err.value.problems)


def test_two_sites_on_one_queue_are_refused():
    def edit(data: dict) -> None:
        data["settings"]["sites"] = {"a": {"work_queue": "q"}, "b": {"work_queue": "q"}}
    with pytest.raises(ConfigError) as err:
        _inv(edit)
    assert "'q' is also site 'a'" in str(err.value) + "\n".join(err.value.problems)


def test_every_site_gets_its_own_site_check_deployment_on_its_queue():
    inv = _inv(_sites)
    placed = [(p.name, p.work_queue) for p in place(_decl("site-check"), inv)]
    assert placed == [("site-check", "pve"), ("site-check-nas", "nas")]


def test_a_late_run_is_a_late_row_in_status_with_the_reason():
    from datetime import UTC, datetime

    from labkeeper import status as st
    from tasks.history import _late_detail

    class Queue:
        status = "NOT_READY"
        last_polled = None

    detail = _late_detail(("homelab", "offsite"), Queue())
    assert detail == "Late: no live worker polls queue offsite of pool homelab (last polled: never)"
    now = datetime.now(UTC)
    inv = _inv(lambda d: None)
    rows = st.evaluate(inv, st.Facts(now=now, failed_runs=[
        {"name": "brave-owl", "flow": "site-check", "state": "Late", "start": now,
         "detail": detail}], errors=[]))
    [row] = [r for r in rows if r.section == "runs"]
    assert (row.target, row.state, row.detail) == ("site-check/brave-owl", "late", detail)
    assert st.exit_code([row]) != 0
