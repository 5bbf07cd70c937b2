"""Fault injection, and every simulated answer checked against the structure's `returns`."""

from __future__ import annotations

import time

import pytest
import requests
from proxmoxer.core import ResourceException

from labkeeper.pvesim.schema import ApiSchema, check_returns

TOKEN_USER = "labkeeper@pve"  # as in tests/fixtures/pvesim.py
TOKEN_NAME = "ci"

pytestmark = pytest.mark.integration

TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


@pytest.fixture(autouse=True)
def _clear_faults(pvesim):
    yield
    pvesim.faults.clear()


def make_ct(pve, sim, vmid: int) -> None:
    upid = pve.nodes("pve2").lxc.post(vmid=vmid, ostemplate=TEMPLATE, rootfs="local-lvm:1")
    assert sim.wait_task(upid)["exitstatus"] == "OK"


def test_injected_task_failure_ends_with_task_error(pvesim, pve) -> None:
    make_ct(pve, pvesim, 301)
    pvesim.faults.fail_tasks("vzstart", "startup for container '301' failed", count=1)
    record = pvesim.wait_task(pve.nodes("pve2").lxc(301).status.start.post())
    assert record["exitstatus"] == "startup for container '301' failed"
    assert record["log"][-2:] == ["", "TASK ERROR: startup for container '301' failed"]
    assert pve.nodes("pve2").lxc(301).status.current.get()["status"] == "stopped"
    # only the next one failed
    assert pvesim.wait_task(pve.nodes("pve2").lxc(301).status.start.post())["exitstatus"] == "OK"


def test_injected_vzdump_failure_is_job_errors(pvesim, pve) -> None:
    make_ct(pve, pvesim, 302)
    pvesim.faults.fail_tasks("vzdump", "zstd: error 70 : Write error", count=1)
    record = pvesim.wait_task(pve.nodes("pve2").vzdump.post(vmid="302", storage="local"))
    assert record["exitstatus"] == "job errors"
    assert "ERROR: Backup of VM 302 failed - zstd: error 70 : Write error" in record["log"]
    assert "INFO: Backup job finished with errors" in record["log"]
    assert pvesim.guest(302)["config"].get("lock") is None


def test_full_storage_makes_vzdump_fail_realistically(pvesim, pve) -> None:
    make_ct(pve, pvesim, 303)
    pvesim.faults.storage_full("local", node="pve2")
    status = pve.nodes("pve2").storage("local").status.get()
    assert status["avail"] == 0
    record = pvesim.wait_task(pve.nodes("pve2").vzdump.post(vmid="303", storage="local"))
    assert record["exitstatus"] == "job errors"
    assert any("No space left on device" in line for line in record["log"])
    assert pve.nodes("pve2").storage("local").content.get(vmid=303) == []


def test_hanging_task_runs_until_cleared_or_stopped(pvesim, pve) -> None:
    make_ct(pve, pvesim, 304)
    make_ct(pve, pvesim, 305)
    pvesim.faults.hang_tasks("vzstart", count=1)
    upid = pve.nodes("pve2").lxc(304).status.start.post()
    # The same task started later, without the fault, runs its course meanwhile (however
    # slow the machine): the hung one is still running after it, not merely not done yet.
    control = pve.nodes("pve2").lxc(305).status.start.post()
    assert pvesim.wait_task(control, timeout=60)["exitstatus"] == "OK"
    assert pve.nodes("pve2").tasks(upid).status.get()["status"] == "running"
    pve.nodes("pve2").tasks(upid).delete()
    record = pvesim.wait_task(upid)
    assert record["exitstatus"] == "interrupted by signal"


def test_api_errors_answer_503_for_n_requests(pvesim, pve) -> None:
    pvesim.faults.api_errors(503, count=2)
    for _ in range(2):
        with pytest.raises(ResourceException) as exc:
            pve.version.get()
        assert exc.value.status_code == 503
    assert pve.version.get()["release"] == "9.1"


def test_latency_delays_answers(pvesim, pve) -> None:
    pvesim.faults.latency(0.3)
    started = time.monotonic()
    pve.version.get()
    assert time.monotonic() - started >= 0.3


def test_faults_over_http_need_auth_and_apply(pvesim, pvesim_credentials) -> None:
    url = f"{pvesim.url}/_sim/faults"
    assert requests.post(url, data={"kind": "api-error", "status": "500"},
                         verify=pvesim.ca_file, timeout=5).status_code == 401
    header = {"Authorization": f"PVEAPIToken={TOKEN_USER}!{TOKEN_NAME}="
                               f"{pvesim_credentials.token_secret}"}
    resp = requests.post(url, data={"kind": "api-error", "status": "500", "count": "1"},
                         headers=header, verify=pvesim.ca_file, timeout=5)
    assert resp.status_code == 200 and resp.json()["data"]["api_errors"][0]["status"] == 500
    version = requests.get(f"{pvesim.url}/api2/json/version", headers=header,
                           verify=pvesim.ca_file, timeout=5)
    assert version.status_code == 500 and "message" in version.json()
    assert requests.delete(url, headers=header, verify=pvesim.ca_file,
                           timeout=5).status_code == 200


# ----------------------------------------------------------------------------- returns


def test_responses_conform_to_the_returns_structure(pvesim, pve) -> None:
    schema = ApiSchema()
    make_ct(pve, pvesim, 310)
    ct = pve.nodes("pve2").lxc(310)
    snap = pvesim.wait_task(ct.snapshot.post(snapname="base"))
    backup = pvesim.wait_task(pve.nodes("pve2").vzdump.post(vmid="310", storage="local",
                                                            **{"notes-template": "n"}))
    volid = pve.nodes("pve2").storage("local").content.get(vmid=310)[0]["volid"]
    pve.cluster.backup.post(id="returns-job", schedule="daily", vmid="310", storage="local")
    upid = backup["upid"]
    calls = [
        ("/version", {}, pve.version.get()),
        ("/nodes", {}, pve.nodes.get()),
        ("/nodes/{node}/status", {}, pve.nodes("pve2").status.get()),
        ("/cluster/status", {}, pve.cluster.status.get()),
        ("/cluster/resources", {}, pve.cluster.resources.get()),
        ("/cluster/nextid", {}, pve.cluster.nextid.get()),
        ("/nodes/{node}/lxc", {}, pve.nodes("pve2").lxc.get()),
        ("/nodes/{node}/qemu", {}, pve.nodes("pve1").qemu.get()),
        ("/nodes/{node}/lxc/{vmid}/status/current", {}, ct.status.current.get()),
        ("/nodes/{node}/qemu/{vmid}/status/current", {},
         pve.nodes("pve1").qemu(9000).status.current.get()),
        ("/nodes/{node}/lxc/{vmid}/config", {}, ct.config.get()),
        ("/nodes/{node}/qemu/{vmid}/config", {}, pve.nodes("pve1").qemu(9000).config.get()),
        ("/nodes/{node}/lxc/{vmid}/snapshot", {}, ct.snapshot.get()),
        ("/nodes/{node}/tasks", {}, pve.nodes("pve2").tasks.get()),
        ("/nodes/{node}/tasks/{upid}/status", {}, pve.nodes("pve2").tasks(upid).status.get()),
        ("/nodes/{node}/tasks/{upid}/log", {}, pve.nodes("pve2").tasks(upid).log.get()),
        ("/nodes/{node}/storage", {}, pve.nodes("pve2").storage.get()),
        ("/nodes/{node}/storage/{storage}/status", {},
         pve.nodes("pve2").storage("local").status.get()),
        ("/nodes/{node}/storage/{storage}/content", {},
         pve.nodes("pve2").storage("local").content.get()),
        ("/nodes/{node}/storage/{storage}/content/{volume}", {},
         pve.nodes("pve2").storage("local").content(volid).get()),
        ("/nodes/{node}/storage/{storage}/prunebackups", {},
         pve.nodes("pve2").storage("local").prunebackups.get()),
        ("/cluster/backup", {}, pve.cluster.backup.get()),
        ("/cluster/backup/{id}", {}, pve.cluster.backup("returns-job").get()),
        ("/cluster/backup-info/not-backed-up", {},
         pve.cluster("backup-info")("not-backed-up").get()),
        ("/pools", {}, pve.pools.get()),
        ("/access/permissions", {}, pve.access.permissions.get()),
    ]
    problems = []
    for template, _, value in calls:
        returns = schema.endpoint(template, "GET")["returns"]
        problems += [f"GET {template}: {p}" for p in check_returns(returns, value)]
    for template, method, value in [
        ("/nodes/{node}/lxc/{vmid}/snapshot", "POST", snap["upid"]),
        ("/nodes/{node}/vzdump", "POST", upid),
    ]:
        problems += check_returns(schema.endpoint(template, method)["returns"], value)
    assert problems == []
    pve.cluster.backup("returns-job").delete()
