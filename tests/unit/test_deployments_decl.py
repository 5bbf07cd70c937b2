"""prefect.yaml is the one declaration of deployments; `labkeeper serve` reads it."""

from __future__ import annotations

from deployments.serve import declared, load_deployments

ON_DEMAND = {"provision", "runbook"}


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
