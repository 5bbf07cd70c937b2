"""`labkeeper serve`: path-set drills run on ``drills.paths.schedule``."""

from __future__ import annotations

from deployments.serve import declared, plan_schedules
from labkeeper.inventory import parse_inventory
from tests.unit.test_deployments_decl import MINIMAL

BASE = MINIMAL


def _plan(inv) -> list[tuple[str, dict]]:
    decl = next(d for d in declared() if d["name"] == "weekly-dr-drill")
    return [(p.cron, p.parameters) for p in plan_schedules(decl, inv)]


def test_path_set_drills_with_their_own_schedule_get_a_schedule_of_their_own():
    inv = parse_inventory(BASE + """
drills: {schedule: "0 5 * * 0", repository: {enabled: false},
         paths: {schedule: "0 7 * * 1"}}
""", "t.yaml")
    assert _plan(inv) == [("0 5 * * 0", {"target": "db:a"}),
                          ("0 7 * * 1", {"target": "paths:nas/p"})]


def test_path_set_drills_do_not_take_the_repository_drills_schedule():
    inv = parse_inventory(BASE + """
drills: {schedule: "0 5 * * 0", repository: {enabled: false, schedule: "0 8 * * 2"}}
""", "t.yaml")
    assert _plan(inv) == [("0 5 * * 0", {"target": "all"})]
