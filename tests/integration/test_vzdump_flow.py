"""The vzdump flow against the simulator, on a real (temporary) Prefect server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from flows.vzdump import VzdumpRunFailed, vzdump_flow
from labkeeper.pvesim.api import add_backup
from tests.fixtures.waiting import wait_until
from tests.integration.test_doctor_flow import _flow_run_record
from tests.integration.test_vzdump_support import VzEnv, archives, job, vzdump_tasks

pytestmark = pytest.mark.integration



@pytest.fixture(scope="module")
def env(lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VzEnv]:
    e = VzEnv(lab, tmp_path_factory.mktemp("vzdump"))
    try:
        yield e
    finally:
        e.stop()


@pytest.fixture
def clean(env: VzEnv) -> Iterator[VzEnv]:
    yield env
    env.sim.faults.clear()


def _rows_by_vmid(rows: list[dict]) -> dict[int, dict]:
    return {r["vmid"]: r for r in rows}


def _failed_rows(state) -> dict[int, dict]:
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, VzdumpRunFailed), exc
    return _rows_by_vmid(exc.rows)


def test_tagged_guests_are_backed_up_one_per_node_verified_and_pruned(clean: VzEnv,
                                                                      prefect_harness):
    env = clean
    vmids = env.guests("nightly", {"pve1": 3, "pve2": 2, "pve3": 1})
    old = int(time.time()) - 30 * 86400
    for i in range(3):
        add_backup(env.sim, vmids[0], old + i * 86400, node="pve1",
                   notes="ct", protected=(i == 0), size=100)
    path = env.inventory([job("nightly", "nightly", retention={"keep_last": 2},
                              notes_template="{{guestname}} on {{node}}")])
    state = vzdump_flow(job="nightly", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    rows = _rows_by_vmid(state.result())
    assert set(rows) == set(vmids)
    assert {r["status"] for r in rows.values()} == {"ok"}
    for vmid in vmids:
        row = rows[vmid]
        assert row["archive"].startswith(f"local:backup/vzdump-lxc-{vmid}-")
        assert row["size"] > 0
        assert any(a["volid"] == row["archive"] and a["notes"] == f"ct{vmid} on {row['node']}"
                   for a in archives(env.sim, vmid))
    # retention: of 3 old (1 protected) + 1 new, keep-last=2 keeps the new and the newest
    # old one; the protected one stays; one old one is removed
    assert rows[vmids[0]]["pruned"] == 1
    left = {a["volid"] for a in archives(env.sim, vmids[0])}
    assert len(left) == 3 and any(a.get("protected") for a in archives(env.sim, vmids[0]))
    # never two vzdumps on one node at once: PVE would have logged a global-lock wait
    tasks = vzdump_tasks(env.sim, vmids)
    assert len(tasks) == len(vmids)
    assert not any("trying to get global lock" in line for t in tasks for line in t["log"])
    _run, _logs, arts = _flow_run_record(state)
    table = next(a for a in arts if a.key == "vzdump")
    assert table.type == "table"
    assert str(vmids[0]) in str(table.data)


def test_selection_matching_nothing_is_a_warning_in_the_artifact(clean: VzEnv,
                                                                 prefect_harness):
    path = clean.inventory([job("nobody", "no-such-tag")])
    state = vzdump_flow(job="nobody", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert rows[0]["status"] == "warning"
    assert "matched no guest" in rows[0]["detail"]
    _run, _logs, arts = _flow_run_record(state)
    assert "matched no guest" in str(next(a for a in arts if a.key == "vzdump").data)


def test_a_failing_vzdump_fails_the_run_after_every_guest_was_tried(clean: VzEnv,
                                                                     prefect_harness):
    env = clean
    vmids = env.guests("failing", {"pve1": 2, "pve2": 1})
    env.sim.faults.fail_tasks("vzdump", "simulated tar failure: exit code 2", vmid=vmids[0])
    path = env.inventory([job("failing", "failing")])
    state = vzdump_flow(job="failing", lab=str(path), return_state=True)
    assert state.is_failed()
    rows = _failed_rows(state)
    assert rows[vmids[0]]["status"] == "failed"
    assert "job errors" in rows[vmids[0]]["detail"]
    assert "simulated tar failure" in rows[vmids[0]]["detail"]
    assert rows[vmids[1]]["status"] == "ok" and rows[vmids[2]]["status"] == "ok"
    assert f"{vmids[0]}" in str(state.message)


def test_task_warnings_show_as_success_with_warnings(clean: VzEnv, prefect_harness):
    env = clean
    vmids = env.guests("warny", {"pve2": 1})
    env.sim.faults.warn_tasks("vzdump", "EFI disk lacks the 2023 certificate", vmid=vmids[0])
    path = env.inventory([job("warny", "warny")])
    state = vzdump_flow(job="warny", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    row = state.result()[0]
    assert row["status"] == "warning"
    assert "WARNINGS: 1" in row["detail"] and "EFI disk" in row["detail"]


def test_a_hung_vzdump_times_out_is_stopped_and_the_node_moves_on(clean: VzEnv,
                                                                  prefect_harness):
    env = clean
    vmids = env.guests("hangy", {"pve3": 2})
    env.sim.faults.hang_tasks("vzdump", vmid=vmids[0])
    path = env.inventory([job("hangy", "hangy")])
    started = time.monotonic()
    state = vzdump_flow(job="hangy", lab=str(path), return_state=True, task_timeout=1.0)
    assert time.monotonic() - started < 30
    rows = _failed_rows(state)
    assert rows[vmids[0]]["status"] == "failed"
    assert "ran past 1s; stopped it" in rows[vmids[0]]["detail"]
    assert rows[vmids[1]]["status"] == "ok"
    hung = next(t for t in vzdump_tasks(env.sim, [vmids[0]]))
    assert hung["status"] == "stopped" and hung["exitstatus"] == "interrupted by signal"


def test_api_503s_for_a_while_during_the_wait_are_ridden_out(clean: VzEnv, prefect_harness):
    env = clean
    vmids = env.guests("flaky", {"pve1": 1})
    env.sim.faults.hang_tasks("vzdump", vmid=vmids[0])

    def storm() -> None:
        try:
            wait_until(lambda: vzdump_tasks(env.sim, vmids), timeout=60,
                       what="the guest's vzdump task")
            env.sim.faults.api_errors(503, count=6)
            # the flow's polls of the (hung) task ran into every one of the 503s
            wait_until(lambda: env.sim.faults.snapshot()["api_errors"] == [], timeout=60,
                       what="the flow to be served the six 503s")
        finally:
            env.sim.faults.release_event.set()

    t = threading.Thread(target=storm)
    t.start()
    path = env.inventory([job("flaky", "flaky")])
    state = vzdump_flow(job="flaky", lab=str(path), return_state=True)
    t.join()
    assert state.is_completed(), state.message
    row = state.result()[0]
    assert row["status"] == "ok"
    assert "earlier attempt" not in row["detail"]  # ridden out in the wait, not by a retry
    assert env.sim.faults.snapshot()["api_errors"] == []  # every 503 was served
    assert len(vzdump_tasks(env.sim, vmids)) == 1 and len(archives(env.sim, vmids[0])) == 1


def test_a_locked_guest_is_retried_later_in_the_run_then_reported(clean: VzEnv,
                                                                  prefect_harness):
    env = clean
    stuck, freed, other = env.guests("locky", {"pve2": 3})
    with env.sim.lock:
        env.sim.state["guests"][str(stuck)]["config"]["lock"] = "snapshot"
        env.sim.state["guests"][str(freed)]["config"]["lock"] = "migrate"

    class UnlockAfterTheFirstRefusal(logging.Handler):
        """The guest's migration ends once the run's first try found it locked: as soon
        as that try says so (in the task's thread, before the run schedules the next)."""

        def __init__(self) -> None:
            super().__init__()
            self.refused = 0

        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith(f"guest {freed} ") and "locked (migrate)" in text \
                    and "try again later" in text:
                self.refused += 1
                with env.sim.lock:
                    env.sim.state["guests"][str(freed)]["config"].pop("lock", None)

    unlock = UnlockAfterTheFirstRefusal()
    task_logger = logging.getLogger("prefect.task_runs")  # get_run_logger() in a task
    task_logger.addHandler(unlock)
    path = env.inventory([job("locky", "locky")],
                         tuning={"vzdump_lock_retries": 2, "vzdump_lock_retry_delay": 0.4})
    try:
        state = vzdump_flow(job="locky", lab=str(path), return_state=True)
    finally:
        task_logger.removeHandler(unlock)
    assert unlock.refused == 1, "the guest was not refused exactly once while locked"
    rows = _failed_rows(state)
    assert rows[stuck]["status"] == "failed"
    assert "still locked (snapshot) after 3 tries" in rows[stuck]["detail"]
    assert rows[freed]["status"] == "ok"
    assert rows[other]["status"] == "ok"
    with env.sim.lock:
        env.sim.state["guests"][str(stuck)]["config"].pop("lock", None)


def test_a_full_storage_fails_that_guest_with_the_log_tail(clean: VzEnv, prefect_harness):
    env = clean
    full, fine = env.guests("fully", {"pve3": 1, "pve1": 1})
    env.sim.faults.storage_full("local", node="pve3")
    path = env.inventory([job("fully", "fully")])
    state = vzdump_flow(job="fully", lab=str(path), return_state=True)
    rows = _failed_rows(state)
    assert rows[full]["status"] == "failed"
    assert "No space left on device" in rows[full]["detail"]
    assert rows[fine]["status"] == "ok"
    assert archives(env.sim, full) == []


def test_a_rerun_in_the_same_period_skips_guests_already_backed_up(clean: VzEnv,
                                                                   prefect_harness):
    env = clean
    vmids = env.guests("again", {"pve1": 1, "pve2": 1})
    path = env.inventory([job("again", "again", schedule="0 * * * *")])
    # hourly: make sure both runs fall into the same hour
    while time.gmtime().tm_min == 59 and time.gmtime().tm_sec > 30:
        time.sleep(0.5)
    first = vzdump_flow(job="again", lab=str(path), return_state=True)
    second = vzdump_flow(job="again", lab=str(path), return_state=True)
    assert first.is_completed() and second.is_completed()
    assert {r["status"] for r in second.result()} == {"skipped"}
    for vmid in vmids:
        assert len(archives(env.sim, vmid)) == 1
    forced = vzdump_flow(job="again", lab=str(path), return_state=True, force=True)
    assert {r["status"] for r in forced.result()} == {"ok"}
    assert all(len(archives(env.sim, v)) == 2 for v in vmids)


def test_dry_run_retention_lists_but_removes_nothing(clean: VzEnv, prefect_harness):
    env = clean
    (vmid,) = env.guests("dry", {"pve1": 1})
    old = int(time.time()) - 40 * 86400
    for i in range(3):
        add_backup(env.sim, vmid, old + i * 86400, node="pve1", notes="x", size=100)
    path = env.inventory([job("dry", "dry", retention={"keep_last": 1})])
    state = vzdump_flow(job="dry", lab=str(path), return_state=True, dry_run_retention=True)
    assert state.is_completed(), state.message
    assert state.result()[0]["pruned"] == "3 (dry run)"
    assert len(archives(env.sim, vmid)) == 4


def test_an_adhoc_run_prunes_nothing_and_says_so_in_the_logs_and_the_artifact(
        clean: VzEnv, prefect_harness):
    env = clean
    (vmid,) = env.guests("adhoc", {"pve2": 1})
    old = int(time.time()) - 40 * 86400
    for i in range(3):
        add_backup(env.sim, vmid, old + i * 86400, node="pve2", notes="x", size=100)
    path = env.inventory([job("adhoc-job", "adhoc", retention={"keep_last": 1})])
    state = vzdump_flow(lab=str(path), selection={"tags": ["adhoc"]}, storage="local",
                        return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["status"] == "ok"
    assert row["pruned"] == "skipped (ad-hoc run)"
    assert len(archives(env.sim, vmid)) == 4  # the job's keep_last=1 was not applied
    _run, logs, arts = _flow_run_record(state)
    assert any("retention is not applied" in lg.message and lg.level >= 30 for lg in logs)
    table = next(a for a in arts if a.key == "vzdump")
    assert "retention not applied (ad-hoc run)" in (table.description or "")
    summary = next(a for a in arts if a.key == "vzdump-summary")
    assert "retention **not applied** (ad-hoc run)" in str(summary.data)
    assert "retention is not applied" in str(summary.data)


def test_at_most_max_per_node_vzdumps_run_at_once_on_a_node(clean: VzEnv, prefect_harness):
    env = clean
    vmids = env.guests("pairs", {"pve1": 5})
    running: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            tasks = vzdump_tasks(env.sim, vmids)
            running.append(sum(1 for t in tasks if t["status"] == "running"))
            time.sleep(0.005)

    path = env.inventory([job("pairs", "pairs", max_per_node=2)])
    watcher = threading.Thread(target=watch)
    env.sim.task_duration = 0.4
    watcher.start()
    try:
        state = vzdump_flow(job="pairs", lab=str(path), return_state=True, force=True)
    finally:
        stop.set()
        watcher.join()
        env.sim.task_duration = 0.05
    assert state.is_completed(), state.message
    assert {r["status"] for r in state.result()} == {"ok"}
    assert max(running) == 2  # two at a time: the limit, and used
    assert len(vzdump_tasks(env.sim, vmids)) == 5


def test_a_retried_attempt_adopts_the_archive_its_first_attempt_made(clean: VzEnv):
    """A backup task that fails after its vzdump (say, the storage listing answers 503
    while verifying) is retried by Prefect; the retry must not back up again."""
    from labkeeper import vzdump as core
    from labkeeper.inventory import load_inventory
    from tasks.vzdump import api_for

    env = clean
    (vmid,) = env.guests("resume", {"pve3": 1})
    inv = load_inventory(str(env.inventory([job("resume", "resume")])))
    spec, api = inv.vzdump_job("resume"), api_for(inv)
    target = core.resolve(api, inv, spec).targets[0]
    first_try = float(int(time.time()))
    made = core.backup_guest(api, spec, target, poll_max=0.1)
    retried = core.backup_guest(api, spec, target, poll_max=0.1, resume_since=first_try)
    assert (retried.status, retried.volid) == ("ok", made.volid)
    assert "earlier attempt" in retried.detail
    assert len(vzdump_tasks(env.sim, [vmid])) == 1 and len(archives(env.sim, vmid)) == 1
