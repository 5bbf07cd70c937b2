"""The Proxmox VE simulator through proxmoxer over verified TLS: auth, validation, flows."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests
from proxmoxer import ProxmoxAPI
from proxmoxer.core import ResourceException

from labkeeper.pvesim import Simulator
from tests.fixtures.waiting import wait_until

TOKEN_USER = "labkeeper@pve"  # as in tests/fixtures/pvesim.py
TOKEN_NAME = "ci"

pytestmark = pytest.mark.integration

TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


def wait(sim: Simulator, upid: str) -> dict:
    return sim.wait_task(upid, timeout=10)


def create_ct(pve: ProxmoxAPI, sim: Simulator, vmid: int, **extra) -> dict:
    upid = pve.nodes("pve1").lxc.post(vmid=vmid, ostemplate=TEMPLATE, rootfs="local-lvm:2",
                                      hostname=f"ct{vmid}", **extra)
    record = wait(sim, upid)
    assert record["exitstatus"] == "OK", record["log"]
    return record


# ------------------------------------------------------------------------------- serving/auth


def test_tls_is_verified_with_ca_file_and_fingerprint_is_exposed(pvesim, pve) -> None:
    assert pve.version.get()["release"] == "9.1"
    assert len(pvesim.fingerprint.split(":")) == 32
    assert pve.nodes.get()[0]["ssl_fingerprint"] == pvesim.fingerprint


def test_client_without_the_ca_refuses_the_certificate(pvesim) -> None:
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(f"{pvesim.url}/api2/json/version", timeout=5)


def test_wrong_token_secret_is_401(pvesim) -> None:
    bad = ProxmoxAPI(pvesim.host, port=pvesim.port, user=TOKEN_USER, token_name=TOKEN_NAME,
                     token_value="wrong", verify_ssl=pvesim.ca_file)
    with pytest.raises(ResourceException) as exc:
        bad.version.get()
    assert exc.value.status_code == 401


def test_no_credentials_is_401(pvesim) -> None:
    resp = requests.get(f"{pvesim.url}/api2/json/nodes", verify=pvesim.ca_file, timeout=5)
    assert resp.status_code == 401 and resp.json()["data"] is None


def test_token_with_colon_separator_is_accepted(pvesim, pvesim_credentials) -> None:
    header = f"PVEAPIToken={TOKEN_USER}!{TOKEN_NAME}:{pvesim_credentials.token_secret}"
    resp = requests.get(f"{pvesim.url}/api2/json/version", headers={"Authorization": header},
                        verify=pvesim.ca_file, timeout=5)
    assert resp.status_code == 200


def test_ticket_login_works_and_wrong_password_is_401(pvesim, pvesim_credentials) -> None:
    px = ProxmoxAPI(pvesim.host, port=pvesim.port, user="root@pam",
                    password=pvesim_credentials.root_password, verify_ssl=pvesim.ca_file)
    assert px.cluster.nextid.get() >= 100
    with pytest.raises(Exception) as exc:  # proxmoxer raises AuthenticationError
        ProxmoxAPI(pvesim.host, port=pvesim.port, user="root@pam", password="nope",
                   verify_ssl=pvesim.ca_file)
    assert "401" in str(exc.value)


def test_ticket_write_without_csrf_token_is_401(pvesim, pvesim_credentials) -> None:
    url = f"{pvesim.url}/api2/json"
    login = requests.post(f"{url}/access/ticket", data={
        "username": "root@pam", "password": pvesim_credentials.root_password},
        verify=pvesim.ca_file, timeout=5).json()["data"]
    cookies = {"PVEAuthCookie": login["ticket"]}
    resp = requests.post(f"{url}/pools", data={"poolid": "csrf"}, cookies=cookies,
                         verify=pvesim.ca_file, timeout=5)
    assert resp.status_code == 401
    resp = requests.post(f"{url}/pools", data={"poolid": "csrf"}, cookies=cookies,
                         headers={"CSRFPreventionToken": login["CSRFPreventionToken"]},
                         verify=pvesim.ca_file, timeout=5)
    assert resp.status_code == 200


def test_limited_token_gets_403_with_pve_message(pvesim, pve_ro) -> None:
    assert pve_ro.nodes("pve1").qemu(9000).status.current.get()["vmid"] == 9000
    with pytest.raises(ResourceException) as exc:
        pve_ro.nodes("pve1").qemu(9000).status.start.post()
    assert exc.value.status_code == 403
    assert "Permission check failed (/vms/9000, VM.PowerMgmt)" in str(exc.value)


def test_limited_token_cannot_back_up(pvesim, pve_ro) -> None:
    with pytest.raises(ResourceException) as exc:
        pve_ro.nodes("pve1").vzdump.post(vmid="9000", storage="local")
    assert exc.value.status_code == 403


# ------------------------------------------------------------------------------- validation


def test_invalid_parameters_are_400_with_errors_per_parameter(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").lxc.post(vmid=5, ostemplate=TEMPLATE, bogus=1)
    assert exc.value.status_code == 400
    assert exc.value.content == "Parameter verification failed."
    assert set(exc.value.errors) == {"vmid", "bogus"}


def test_400_body_has_pve_shape_with_message(pvesim, pvesim_credentials) -> None:
    header = f"PVEAPIToken={TOKEN_USER}!{TOKEN_NAME}={pvesim_credentials.token_secret}"
    resp = requests.post(f"{pvesim.url}/api2/json/nodes/pve1/lxc/101/status/start",
                         data={"skiplock": "perhaps"}, headers={"Authorization": header},
                         verify=pvesim.ca_file, timeout=5)
    assert resp.status_code == 400 and resp.reason == "Parameter verification failed."
    assert resp.json() == {"data": None, "message": "Parameter verification failed.",
                           "errors": {"skiplock": "type check ('boolean') failed - got "
                                                  "'perhaps'"}}


def test_unknown_path_is_501_method_not_implemented(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").frobnicate.get()
    assert exc.value.status_code == 501
    assert "Method 'GET /nodes/pve1/frobnicate' not implemented" in str(exc.value)


def test_valid_but_unsimulated_path_is_501_saying_so(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").ceph.status.get()
    assert exc.value.status_code == 501
    assert "not implemented by the labkeeper Proxmox VE simulator" in str(exc.value)


def test_wrong_method_on_known_path_is_501(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.version.post()
    assert exc.value.status_code == 501


# ------------------------------------------------------------------------------- cluster


def test_nextid_skips_used_ids_and_rejects_taken_one(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.cluster.nextid.get(vmid=9000)
    assert exc.value.status_code == 400 and "VM 9000 already exists" in str(exc.value)
    assert str(pve.cluster.nextid.get()) not in pvesim.state["guests"]


def test_seed_has_storages_templates_and_qemu_template(pvesim, pve) -> None:
    storages = {s["storage"]: s for s in pve.nodes("pve2").storage.get()}
    assert storages["local"]["type"] == "dir" and storages["local-lvm"]["type"] == "lvmthin"
    content = pve.nodes("pve2").storage("local").content.get(content="vztmpl")
    assert TEMPLATE in {c["volid"] for c in content}
    vm = pve.nodes("pve1").qemu(9000).config.get()
    assert vm["template"] == 1 and vm["name"] == "debian12-cloudinit"


# ------------------------------------------------------------------------------- lifecycle


def test_lxc_create_start_shutdown_destroy(pvesim, pve) -> None:
    record = create_ct(pve, pvesim, 201, net0="name=eth0,bridge=vmbr0,ip=dhcp", tags="web")
    assert record["type"] == "vzcreate" and record["log"][-1] == "TASK OK"
    assert any(line.startswith("extracting archive '/var/lib/vz/template/cache/")
               for line in record["log"])
    ct = pve.nodes("pve1").lxc(201)
    assert ct.config.get()["rootfs"] == "local-lvm:vm-201-disk-0,size=2G"
    assert wait(pvesim, ct.status.start.post())["exitstatus"] == "OK"
    assert ct.status.current.get()["status"] == "running"
    with pytest.raises(ResourceException) as exc:
        ct.status.start.post()
    assert "CT 201 already running" in str(exc.value)
    with pytest.raises(ResourceException) as exc:
        ct.delete()
    assert "CT 201 is running - destroy failed" in str(exc.value)
    assert wait(pvesim, ct.status.shutdown.post())["exitstatus"] == "OK"
    assert wait(pvesim, ct.delete())["exitstatus"] == "OK"
    assert 201 not in {g["vmid"] for g in pve.nodes("pve1").lxc.get()}
    assert "local-lvm:vm-201-disk-0" not in {
        c["volid"] for c in pve.nodes("pve1").storage("local-lvm").content.get()}


def test_existing_vmid_cannot_be_created_again(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve2").lxc.post(vmid=9000, ostemplate=TEMPLATE, rootfs="local-lvm:2")
    assert "VM 9000 already exists on node 'pve1'" in str(exc.value)


def test_rootfs_on_dir_storage_is_refused(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").lxc.post(vmid=202, ostemplate=TEMPLATE)
    assert "storage 'local' does not support container directories" in str(exc.value)


def test_missing_guest_gives_pve_config_file_error(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").lxc(999).status.current.get()
    assert "Configuration file 'nodes/pve1/lxc/999.conf' does not exist" in str(exc.value)


def test_config_put_and_delete_and_digest_check(pvesim, pve) -> None:
    create_ct(pve, pvesim, 203)
    ct = pve.nodes("pve1").lxc(203)
    ct.config.put(memory=1024, tags="db;prod", onboot=1)
    cfg = ct.config.get()
    assert cfg["memory"] == 1024 and cfg["tags"] == "db;prod"
    ct.config.put(delete="onboot", digest=cfg["digest"])
    assert "onboot" not in ct.config.get()
    with pytest.raises(ResourceException) as exc:
        ct.config.put(memory=2048, digest=cfg["digest"])
    assert "detected modified configuration" in str(exc.value)


def test_task_list_status_and_paged_log(pvesim, pve) -> None:
    record = create_ct(pve, pvesim, 204)
    upid = record["upid"]
    status = pve.nodes("pve1").tasks(upid).status.get()
    assert status["status"] == "stopped" and status["exitstatus"] == "OK"
    full = pve.nodes("pve1").tasks(upid).log.get()
    assert full[0]["n"] == 1 and full[-1]["t"] == "TASK OK"
    page = pve.nodes("pve1").tasks(upid).log.get(start=1, limit=2)
    assert [e["n"] for e in page] == [2, 3]
    listed = pve.nodes("pve1").tasks.get(vmid=204, typefilter="vzcreate")
    assert listed[0]["upid"] == upid and listed[0]["status"] == "OK"


# ------------------------------------------------------------------------------- backups


def test_vzdump_writes_backup_with_notes_and_log_in_pve_wording(pvesim, pve) -> None:
    create_ct(pve, pvesim, 210)
    upid = pve.nodes("pve1").vzdump.post(vmid="210", storage="local", mode="snapshot",
                                         compress="zstd", **{"notes-template": "{{guestname}}"})
    record = wait(pvesim, upid)
    assert record["exitstatus"] == "OK", record["log"]
    log = record["log"]
    assert log[0].startswith("INFO: starting new backup job: vzdump 210 ")
    assert "INFO: Starting Backup of VM 210 (lxc)" in log
    assert "INFO: Backup job finished successfully" in log and log[-1] == "TASK OK"
    backups = pve.nodes("pve1").storage("local").content.get(content="backup", vmid=210)
    assert len(backups) == 1
    b = backups[0]
    assert b["volid"].startswith("local:backup/vzdump-lxc-210-") and b["volid"].endswith(
        ".tar.zst")
    assert b["notes"] == "ct210" and b["format"] == "tar.zst" and b["protected"] == 0
    assert b["size"] > 0 and b["subtype"] == "lxc"


def test_vzdump_to_storage_without_backup_content_fails(pvesim, pve) -> None:
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").vzdump.post(vmid="9000", storage="local-lvm")
    assert "storage 'local-lvm' does not support backups" in str(exc.value)


def test_locked_guest_refuses_snapshot_during_backup(pvesim, pve) -> None:
    create_ct(pve, pvesim, 211)
    pvesim.faults.hang_tasks("vzdump", count=1, vmid=211)
    try:
        upid = pve.nodes("pve1").vzdump.post(vmid="211", storage="local")
        wait_until(lambda: pvesim.guest(211)["config"].get("lock") == "backup", timeout=60,
                   what="the backup lock on CT 211")
        with pytest.raises(ResourceException) as exc:
            pve.nodes("pve1").lxc(211).snapshot.post(snapname="s1")
        assert exc.value.status_code == 500
        assert exc.value.content == "CT is locked (backup)"
        second = pve.nodes("pve1").vzdump.post(vmid="211", storage="local")
        # it waits for the node's vzdump lock, which the hung first one holds
        wait_until(lambda: "INFO: trying to get global lock - waiting..." in [
            line["t"] for line in pve.nodes("pve1").tasks(second).log.get()],
            timeout=60, what="the second vzdump to wait for the global lock")
        assert pve.nodes("pve1").tasks(second).status.get()["status"] == "running"
    finally:
        pvesim.faults.clear()
    assert wait(pvesim, upid)["exitstatus"] == "OK"
    log = wait(pvesim, second)["log"]
    assert "INFO: trying to get global lock - waiting..." in log
    assert "INFO: got global lock" in log
    assert pvesim.guest(211)["config"].get("lock") is None


def test_vzdump_prune_backups_keeps_last_n(pvesim, pve) -> None:
    create_ct(pve, pvesim, 212)
    now = int(time.time())
    for hours in (30, 20, 10):
        pvesim.add_backup(212, now - hours * 3600)
    upid = pve.nodes("pve1").vzdump.post(vmid="212", storage="local",
                                         **{"prune-backups": "keep-last=2"})
    record = wait(pvesim, upid)
    assert "INFO: prune older backups with retention: keep-last=2" in record["log"]
    assert "INFO: pruned 2 backup(s) not covered by keep-retention policy" in record["log"]
    assert len(pve.nodes("pve1").storage("local").content.get(vmid=212)) == 2


def test_prunebackups_dry_run_and_delete(pvesim, pve) -> None:
    now = int(time.time())
    vols = [pvesim.add_backup(213, now - d * 86400, node="pve2") for d in (1, 2, 3)]
    pvesim.add_backup(213, now - 4 * 86400, node="pve2", protected=True)
    storage = pve.nodes("pve2").storage("local")
    dry = storage.prunebackups.get(vmid=213, **{"prune-backups": "keep-last=1"})
    marks = {e["volid"]: e["mark"] for e in dry}
    assert marks[vols[0]] == "keep" and marks[vols[1]] == "remove"
    assert sorted(marks.values()) == ["keep", "protected", "remove", "remove"]
    upid = storage.prunebackups.delete(vmid=213, **{"prune-backups": "keep-last=1"})
    assert wait(pvesim, upid)["exitstatus"] == "OK"
    assert len(storage.content.get(vmid=213)) == 2


def test_protected_backup_cannot_be_deleted_but_others_can(pvesim, pve) -> None:
    now = int(time.time())
    keep = pvesim.add_backup(214, now - 100, node="pve3", protected=True)
    drop = pvesim.add_backup(214, now - 50, node="pve3")
    storage = pve.nodes("pve3").storage("local")
    with pytest.raises(ResourceException):
        storage.content(keep).delete()
    assert wait(pvesim, storage.content(drop).delete())["exitstatus"] == "OK"
    storage.content(keep).put(protected=0, notes="unprotected")
    assert storage.content(keep).get()["notes"] == "unprotected"


def test_restore_from_backup_recreates_guest_and_files(pvesim, pve, tmp_path: Path) -> None:
    create_ct(pve, pvesim, 215)
    root = tmp_path / "rootfs215"
    pvesim.set_rootfs_dir(215, root)
    (root / "etc").mkdir()
    (root / "etc" / "app.conf").write_text("version=1\n")
    record = wait(pvesim, pve.nodes("pve1").vzdump.post(vmid="215", storage="local"))
    assert record["exitstatus"] == "OK"
    volid = pve.nodes("pve1").storage("local").content.get(vmid=215)[0]["volid"]
    assert wait(pvesim, pve.nodes("pve1").lxc(215).delete())["exitstatus"] == "OK"
    assert not root.exists()
    upid = pve.nodes("pve1").lxc.post(vmid=215, ostemplate=volid, restore=1,
                                      rootfs="local-lvm:2")
    record = wait(pvesim, upid)
    assert record["type"] == "vzrestore" and record["exitstatus"] == "OK", record["log"]
    assert record["log"][0] == f"recovering backed-up configuration from '{volid}'"
    assert "merging backed-up and given configuration.." in record["log"]
    restored = Path(pvesim.guest(215)["rootfs_dir"])
    assert (restored / "etc" / "app.conf").read_text() == "version=1\n"
    assert pve.nodes("pve1").lxc(215).config.get()["hostname"] == "ct215"


# ------------------------------------------------------------------------------- snapshots


def test_snapshot_rollback_restores_files_and_config(pvesim, pve, tmp_path: Path) -> None:
    create_ct(pve, pvesim, 220)
    root = tmp_path / "rootfs220"
    pvesim.set_rootfs_dir(220, root)
    (root / "data.txt").write_text("before\n")
    ct = pve.nodes("pve1").lxc(220)
    assert wait(pvesim, ct.snapshot.post(snapname="pre_update"))["exitstatus"] == "OK"
    (root / "data.txt").write_text("after\n")
    (root / "new.txt").write_text("junk")
    ct.config.put(memory=4096)
    names = [s["name"] for s in ct.snapshot.get()]
    assert names == ["pre_update", "current"]
    assert wait(pvesim, ct.snapshot("pre_update").rollback.post())["exitstatus"] == "OK"
    assert (root / "data.txt").read_text() == "before\n" and not (root / "new.txt").exists()
    assert ct.config.get()["memory"] == 512
    assert wait(pvesim, ct.snapshot("pre_update").delete())["exitstatus"] == "OK"
    assert [s["name"] for s in ct.snapshot.get()] == ["current"]


def test_snapshot_on_storage_without_snapshots_is_refused(pvesim, pve) -> None:
    pvesim.add_guest(221, "lxc", node="pve1", disk_storage="local")
    with pytest.raises(ResourceException) as exc:
        pve.nodes("pve1").lxc(221).snapshot.post(snapname="snap1")
    assert "snapshot feature is not available" in str(exc.value)


# ------------------------------------------------------------------------------- clone


def test_linked_and_full_clone_of_qemu_template(pvesim, pve) -> None:
    tmpl = pve.nodes("pve1").qemu(9000)
    linked = wait(pvesim, tmpl.clone.post(newid=230, name="linked"))
    assert linked["type"] == "qmclone" and linked["exitstatus"] == "OK"
    assert "create linked clone of drive scsi0 (local-lvm:base-9000-disk-0)" in linked["log"]
    cfg = pve.nodes("pve1").qemu(230).config.get()
    assert cfg["scsi0"].startswith("local-lvm:base-9000-disk-0/vm-230-disk-0")
    assert "template" not in cfg and "lock" not in cfg
    full = wait(pvesim, tmpl.clone.post(newid=231, name="full", full=1))
    assert "create full clone of drive scsi0 (local-lvm:base-9000-disk-0)" in full["log"]
    assert pve.nodes("pve1").qemu(231).config.get()["scsi0"].startswith(
        "local-lvm:vm-231-disk-0")
    with pytest.raises(ResourceException) as exc:
        tmpl.clone.post(newid=231)
    assert "already exists" in str(exc.value)


def test_qemu_restore_from_vma_backup(pvesim, pve) -> None:
    assert wait(pvesim, pve.nodes("pve1").qemu(9000).clone.post(newid=232, full=1))[
        "exitstatus"] == "OK"
    record = wait(pvesim, pve.nodes("pve1").vzdump.post(vmid="232", storage="local",
                                                        compress="zstd"))
    assert record["exitstatus"] == "OK", record["log"]
    volid = pve.nodes("pve1").storage("local").content.get(vmid=232)[0]["volid"]
    assert volid.endswith(".vma.zst")
    upid = pve.nodes("pve1").qemu.post(vmid=233, archive=volid)
    record = wait(pvesim, upid)
    assert record["type"] == "qmrestore" and record["exitstatus"] == "OK", record["log"]
    assert any(line.startswith("new volume ID is 'local-lvm:vm-233-disk-0'")
               for line in record["log"])


# ------------------------------------------------------------------------------- backup jobs


def test_backup_job_crud_and_schedule_validation(pvesim, pve) -> None:
    pve.cluster.backup.post(id="nightly", schedule="sun 01:00", vmid="9000", storage="local",
                            mode="snapshot", **{"prune-backups": "keep-daily=7"})
    jobs = {j["id"]: j for j in pve.cluster.backup.get()}
    assert jobs["nightly"]["schedule"] == "sun 01:00" and jobs["nightly"]["next-run"] > 0
    pve.cluster.backup("nightly").put(schedule="*-*-* 02:30")
    assert pve.cluster.backup("nightly").get()["schedule"] == "*-*-* 02:30"
    with pytest.raises(ResourceException) as exc:
        pve.cluster.backup("nightly").put(schedule="every full moon")
    assert exc.value.status_code == 400
    not_covered = {g["vmid"] for g in pve.cluster("backup-info")("not-backed-up").get()}
    assert 9000 not in not_covered
    pve.cluster.backup("nightly").delete()
    assert "nightly" not in {j["id"] for j in pve.cluster.backup.get()}


# ------------------------------------------------------------------------------- persistence


def test_state_file_persists_guests_across_restart(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    secret = "s" * 36
    sim = Simulator(nodes=("n1",), state_path=state, task_duration=0.01,
                    tokens={"a@pve!t": secret})
    sim.start()
    try:
        px = ProxmoxAPI(sim.host, port=sim.port, user="a@pve", token_name="t",
                        token_value=secret, verify_ssl=sim.ca_file)
        upid = px.nodes("n1").lxc.post(vmid=100, ostemplate=TEMPLATE, rootfs="local-lvm:1")
        assert sim.wait_task(upid)["exitstatus"] == "OK"
    finally:
        sim.stop()
    assert state.exists()
    again = Simulator(nodes=("n1",), state_path=state, tokens={"a@pve!t": secret})
    again.start()
    try:
        px = ProxmoxAPI(again.host, port=again.port, user="a@pve", token_name="t",
                        token_value=secret, verify_ssl=again.ca_file)
        assert [g["vmid"] for g in px.nodes("n1").lxc.get()] == [100]
    finally:
        again.stop()
