"""The provision flow on a temporary Prefect server, against the simulator and local sshd."""

# ruff: noqa: F811 - the `pve` fixture is imported from test_provision and used by name
from __future__ import annotations

import pytest

from flows.provision import PLAN_ARTIFACT, RESULT_ARTIFACT, ProvisionFailed, provision_flow
from labkeeper import provision as pv
from tests.integration.test_doctor_flow import _flow_run_record
from tests.integration.test_provision import Pve, lxc, pve, qemu  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def test_flow_provisions_an_empty_cluster_and_a_second_run_is_a_no_op(pve: Pve, prefect_harness):
    tmp = pve.workdir / "guest-root"
    roles = {"base": {"packages": ["coreutils"],
                      "files": [{"path": str(tmp / "motd"), "content": "{{ guest.name }}\n"}]}}
    path = pve.write([lxc("web", 200, pve, roles=["base"]), qemu("vm", 201)], roles=roles,
                     provision={"guest_state_dir": str(tmp / "state")})
    state = provision_flow(lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["ok"] and result["remaining"]["touched"] == 0
    steps = {(r["guest"], r["step"]): r["status"] for r in result["steps"]}
    assert steps[("web", "create")] == "changed" and steps[("vm", "create")] == "changed"
    assert steps[("web", "wait-ssh")] == "ok" and steps[("web", "bootstrap")] == "changed"
    assert (tmp / "motd").read_text() == "web\n"
    _run, logs, arts = _flow_run_record(state)
    keys = {a.key for a in arts}
    assert {PLAN_ARTIFACT, RESULT_ARTIFACT, f"{RESULT_ARTIFACT}-summary"} <= keys
    plan_md = next(a for a in arts if a.key == PLAN_ARTIFACT).data
    assert "| web | 200 | lxc | pve1 | create |" in plan_md
    assert any("2 create" in log.message for log in logs)
    # the steps' own records are in the run's log, under the task run that made them
    creating = [log for log in logs if log.message.startswith("web: creating LXC 200 on pve1")]
    assert [(log.name, log.level) for log in creating] == [("labkeeper.provision.create", 20)]
    assert creating[0].task_run_id is not None

    pve.sim.requests.clear()
    again = provision_flow(lab=str(path), return_state=True)
    assert again.is_completed(), again.message
    res = again.result()
    assert {r["status"] for r in res["steps"]} <= {"unchanged", "ok"}, res["steps"]
    assert res["plan"]["touched"] == 0
    assert [r for r in pve.sim.requests if r["method"] != "GET"] == []


def test_flow_plan_only_changes_nothing(pve: Pve, prefect_harness):
    path = pve.write([lxc("web", 200)])
    pve.sim.requests.clear()
    state = provision_flow(lab=str(path), plan_only=True, return_state=True)
    assert state.is_completed(), state.message
    assert state.result()["counts"]["create"] == 1
    assert {r["method"] for r in pve.sim.requests} == {"GET"}
    assert pve.sim.guest(200) is None


def test_flow_crash_between_create_and_start_converges(pve: Pve, prefect_harness):
    path = pve.write([lxc("web", 200, pve)])
    from labkeeper.inventory import load_inventory

    inv = load_inventory(path)
    pv.create_guest(pve.api(inv), inv, inv.guest("web"))  # the run died right after this
    state = provision_flow(lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    steps = {r["step"]: r["status"] for r in state.result()["steps"]}
    assert steps == {"start": "changed", "wait-ssh": "ok"}
    assert pve.sim.guest(200)["status"] == "running"  # type: ignore[index]


def test_flow_failed_start_cleans_up_and_fails_naming_the_guest(pve: Pve, prefect_harness):
    path = pve.write([lxc("web", 200, pve), lxc("db", 210, pve)])
    pve.sim.faults.fail_tasks("vzstart", "startup for container '200' failed", vmid=200)
    state = provision_flow(lab=str(path), return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ProvisionFailed)
    assert "1 guest(s) failed" in str(exc)
    steps = {(r["guest"], r["step"]): r["status"] for r in exc.report["steps"]}
    assert steps[("web", "start")] == "failed" and steps[("web", "cleanup")] == "cleanup"
    assert steps[("db", "wait-ssh")] == "ok"
    assert pve.sim.guest(200) is None and pve.sim.guest(210) is not None


def test_flow_refuses_a_big_plan_without_yes(pve: Pve, prefect_harness):
    path = pve.write([lxc("a", 200), lxc("b", 201)], provision={"max_changes_without_yes": 1})
    state = provision_flow(lab=str(path), return_state=True)
    assert state.is_failed()
    exc = state.result(raise_on_failure=False)
    assert isinstance(exc, ProvisionFailed) and "--yes" in str(exc)
    assert pve.sim.guest(200) is None
