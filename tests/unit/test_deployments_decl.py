"""prefect.yaml is the one declaration of deployments; `labkeeper serve` reads it."""

from __future__ import annotations

from deployments.serve import declared, load_deployments


def test_every_declared_deployment_points_at_an_existing_flow_with_a_cron_and_time_zone():
    for d in declared():
        assert d["work_pool"]["name"] == "homelab"
        assert d["schedules"] and all(s["cron"] and s["timezone"] for s in d["schedules"])


def test_served_deployments_mirror_prefect_yaml():
    deps = {d.name: d for d in load_deployments()}
    for d in declared():
        dep = deps[d["name"]]
        assert [s.schedule.cron for s in dep.schedules] == [s["cron"] for s in d["schedules"]]
        assert [s.schedule.timezone for s in dep.schedules] == \
            [s["timezone"] for s in d["schedules"]]
        assert dep.entrypoint.endswith(d["entrypoint"].split(":")[1])
