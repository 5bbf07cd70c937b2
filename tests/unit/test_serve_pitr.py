"""`labkeeper serve` and PITR: the PITR drill on ``drills.schedule``."""

from __future__ import annotations

from deployments.serve import declared, plan_schedules
from labkeeper.inventory import parse_inventory
from tests.unit.test_deployments_decl import MINIMAL

PITR = MINIMAL + """
pitr: [{name: pg1, database: a}]
"""


def _drill_plan(inv) -> list[tuple[str, dict]]:
    decl = next(d for d in declared() if d["name"] == "weekly-dr-drill")
    return [(p.cron, p.parameters) for p in plan_schedules(decl, inv)]


def test_pitr_drills_run_on_the_drills_schedule_beside_targets_with_their_own() -> None:
    inv = parse_inventory(PITR + """
drills: {schedule: "0 5 * * 0", repository: {enabled: false},
         paths: {schedule: "0 7 * * 1"}}
""", "t.yaml")
    assert _drill_plan(inv) == [("0 5 * * 0", {"target": "db:a"}),
                                ("0 7 * * 1", {"target": "paths:nas/p"}),
                                ("0 5 * * 0", {"target": "pitr:pg1"})]


def _plan(name: str, inv) -> list[tuple[str, dict]]:
    decl = next(d for d in declared() if d["name"] == name)
    return [(p.cron, p.parameters) for p in plan_schedules(decl, inv)]


def test_base_backups_and_wal_shipping_are_scheduled_from_the_pitr_section() -> None:
    inv = parse_inventory(MINIMAL + """
pitr:
  - {name: pg1, database: a, base_schedule: "0 4 * * 0"}
  - {name: pg2, database: a, base_schedule: "0 4 * * 3", ship_interval_minutes: 120}
""", "t.yaml")
    assert _plan("pitr-base-backup", inv) == [("0 4 * * 0", {"servers": ["pg1"]}),
                                              ("0 4 * * 3", {"servers": ["pg2"]})]
    assert _plan("pitr-wal-ship", inv) == [("*/5 * * * *", {"servers": ["pg1"]}),
                                           ("0 */2 * * *", {"servers": ["pg2"]})]
    assert _plan("pitr-drill", inv) == []  # inside weekly-dr-drill
    assert _plan("pitr-wal-ship", parse_inventory(MINIMAL, "t.yaml")) == []


def test_serve_starts_one_wal_receiver_per_pitr_server_and_none_without_any() -> None:
    from pathlib import Path

    from deployments.serve import start_wal_receivers
    from labkeeper.pitr.service import receiver_argv

    assert start_wal_receivers(parse_inventory(MINIMAL, "t.yaml"), "/l.yaml") is None
    assert receiver_argv("pg1", Path("/l.yaml"), "/py") == (
        "/py", "-m", "cli.main", "wal", "receive", "pg1", "--lab", "/l.yaml")


def test_a_child_that_keeps_dying_waits_longer_and_a_long_run_resets_the_wait() -> None:
    from labkeeper.pitr.service import next_backoff

    assert [next_backoff(b, 1.0) for b in (0.5, 1.0, 8.0, 60.0)] == [1.0, 2.0, 16.0, 60.0]
    assert next_backoff(60.0, 3600.0) == 1.0


def test_receiver_children_log_from_their_thread_in_the_context_of_who_started_them(
        caplog) -> None:
    """The supervisor's lines are records of ``labkeeper.pitr.service``, emitted by its own
    thread with the starter's context (a flow run's, under Prefect)."""
    import contextvars
    import logging

    from labkeeper.pitr.service import ReceiverChildren
    from tests.fixtures.waiting import wait_until

    run = contextvars.ContextVar("run", default="no run")
    seen: list[tuple[str, str]] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), run.get()))

    caplog.set_level(logging.INFO, logger="labkeeper")
    handler = Seen()
    logging.getLogger("labkeeper.pitr.service").addHandler(handler)
    token = run.set("serve's run")
    try:
        children = ReceiverChildren({"pg1": ("true",)}, max_backoff=1.0, stop_timeout=5)
        run.reset(token)
        children.start()
        try:
            wait_until(lambda: any("exited with 0" in m for m in caplog.messages),
                       timeout=30, what="the child to exit")
        finally:
            children.stop()
    finally:
        logging.getLogger("labkeeper.pitr.service").removeHandler(handler)
    pid = children.children["pg1"].pids[0]
    assert f"wal receive pg1 started (pid {pid})" in caplog.messages
    assert f"wal receive pg1 (pid {pid}) exited with 0; restarting in 1 s" in caplog.messages
    assert {r.name for r in caplog.records} == {"labkeeper.pitr.service"}
    assert seen and {ctx for _m, ctx in seen} == {"serve's run"}, seen
