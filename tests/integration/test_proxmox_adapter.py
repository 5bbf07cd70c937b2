"""The Proxmox adapter through proxmoxer against the simulator, over verified TLS.

This module runs its own simulator (fast tasks) with three tokens: ``least``
holding exactly :data:`labkeeper.proxmox.REQUIRED_PRIVILEGES`, ``nobackup``
holding the same minus ``VM.Backup``, and ``admin`` (unlimited). Every request
the adapter makes here is recorded by the simulator and audited against the
structure file at the end of the module.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, ServiceError, TaskTimeout, is_transient
from labkeeper.inventory import Proxmox
from labkeeper.pvesim import Simulator
from labkeeper.pvesim.schema import FAMILY_CAPS, load_structure

pytestmark = pytest.mark.integration

USER = "labkeeper@pve"
TOKENS = ("least", "nobackup", "admin")
TEMPLATE = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
QEMU_TEMPLATE = 9000
TIMEOUT = 20.0
POLL = 0.02


class Lab:
    def __init__(self, sim: Simulator, secret_dir: Path, secrets: dict[str, str]) -> None:
        self.sim = sim
        self.secret_dir = secret_dir
        self.secrets = secrets

    def spec(self, token: str = "least", *, tls: dict[str, Any] | None = None,
             secret_ref: str | None = None, port: int | None = None) -> Proxmox:
        return Proxmox.model_validate({
            "host": "127.0.0.1", "port": port or self.sim.port,
            "token_id": f"{USER}!{token}",
            "token_secret": secret_ref or f"file:{self.secret_dir / token}",
            "tls": tls if tls is not None else {"ca_file": self.sim.ca_file},
            "timeout": 10, "nodes": [{"name": "pve1"}, {"name": "pve2"}],
        })

    def api(self, token: str = "least", **kw: Any) -> Any:
        return px.connect(self.spec(token, **kw))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    secrets = {name: str(uuid.uuid4()) for name in (*TOKENS, "root")}
    secret_dir = tmp_path_factory.mktemp("pve-secrets")
    for name, value in secrets.items():
        path = secret_dir / name
        path.write_text(value + "\n")
        path.chmod(0o600)
    least = set(px.REQUIRED_PRIVILEGES)
    sim = Simulator(
        nodes=("pve1", "pve2"), task_duration=0.02,
        tokens={f"{USER}!{t}": secrets[t] for t in TOKENS},
        users={"root@pam": secrets["root"]},
        token_privileges={f"{USER}!least": least,
                          f"{USER}!nobackup": least - {"VM.Backup"}},
    )
    sim.state["pools"]["lab"] = {"comment": "labkeeper tests", "vms": []}
    sim.start()
    try:
        yield Lab(sim, secret_dir, secrets)
    finally:
        sim.stop()


@pytest.fixture(scope="module")
def api(lab: Lab) -> Any:
    """The adapter with the least-privilege token, TLS verified by the sim's CA file."""
    return lab.api("least")


@pytest.fixture
def faults(lab: Lab) -> Iterator[Any]:
    yield lab.sim.faults
    lab.sim.faults.clear()


def wait(api: Any, upid: px.Upid, **kw: Any) -> px.TaskResult:
    return px.wait_for_task(api, upid, timeout=kw.pop("timeout", TIMEOUT), poll=POLL, **kw)


_vmids = iter(range(300, 900))


def new_ct(api: Any, *, node: str = "pve1", **kw: Any) -> int:
    vmid = next(_vmids)
    kw.setdefault("rootfs", "local-lvm:1")
    result = wait(api, px.create_lxc(api, node, vmid, TEMPLATE, hostname=f"ct{vmid}", **kw))
    assert result.ok
    return vmid


# ------------------------------------------------------------------------------- TLS and auth


def test_token_auth_with_ca_file_reads_version_and_nodes(api: Any) -> None:
    assert px.version(api) == "9.1.1"
    assert px.version_info(api).release == "9.1"
    assert px.node_names(api) == ["pve1", "pve2"]


def test_pinned_fingerprint_is_accepted(lab: Lab) -> None:
    api = lab.api(tls={"verify": False, "fingerprint": lab.sim.fingerprint})
    assert px.node_names(api) == ["pve1", "pve2"]


def test_wrong_pinned_fingerprint_is_refused_permanently(lab: Lab) -> None:
    wrong = ":".join(["AB"] * 32)
    api = lab.api(tls={"verify": False, "fingerprint": wrong})
    with pytest.raises(ServiceError, match="TLS verification failed") as info:
        px.version(api)
    assert not info.value.transient


def test_system_cas_refuse_the_self_signed_simulator(lab: Lab) -> None:
    api = lab.api(tls={})
    with pytest.raises(ServiceError, match="TLS verification failed") as info:
        px.version(api)
    assert not info.value.transient


def test_verify_false_without_fingerprint_is_refused_before_connecting(lab: Lab) -> None:
    base = lab.spec()
    # model_copy skips the inventory's own validator: connect() must refuse by itself too
    spec = base.model_copy(update={"tls": base.tls.model_copy(update={"verify": False,
                                                                      "ca_file": None})})
    with pytest.raises(ConfigError, match="unverified"):
        px.connect(spec)


def test_wrong_token_secret_is_401_permanent_and_secret_not_in_message(lab: Lab) -> None:
    ref = lab.secret_dir / "wrong"
    wrong = str(uuid.uuid4())
    ref.write_text(wrong)
    api = px.connect(lab.spec(secret_ref=f"file:{ref}"))
    with pytest.raises(ServiceError) as info:
        px.node_names(api)
    assert info.value.status == 401 and not info.value.transient
    assert wrong not in str(info.value)


def test_connection_refused_is_transient(lab: Lab) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = px.connect(lab.spec(port=port))
    with pytest.raises(ServiceError) as info:
        px.version(api)
    assert info.value.transient and info.value.status is None


def test_ticket_login_reads_and_writes_and_wrong_password_is_401(lab: Lab) -> None:
    pw_ref = f"file:{lab.secret_dir / 'root'}"
    api = px.connect_password(lab.spec(), "root@pam", pw_ref)
    assert px.node_names(api) == ["pve1", "pve2"]
    px.create_backup_job(api, "ticket-job", schedule="sun 03:00", vmids=[QEMU_TEMPLATE],
                         storage="local")  # a write: needs the CSRF token
    px.delete_backup_job(api, "ticket-job")
    bad = lab.secret_dir / "badpw"
    bad.write_text(str(uuid.uuid4()))
    with pytest.raises(ServiceError) as info:
        px.connect_password(lab.spec(), "root@pam", f"file:{bad}")
    assert info.value.status == 401 and not info.value.transient
    with pytest.raises(ConfigError, match="ticket login"):
        px.connect_password(lab.spec(tls={"verify": False, "fingerprint": lab.sim.fingerprint}),
                            "root@pam", pw_ref)


# ------------------------------------------------------------------------------- operations


def test_least_privilege_token_runs_every_adapter_operation(lab: Lab, api: Any) -> None:
    """One pass over every operation with exactly REQUIRED_PRIVILEGES; every call succeeds
    and every (method, template) in ADAPTER_CALLS is exercised."""
    first = len(lab.sim.requests)
    # cluster
    assert px.version(api) and px.node_names(api)
    vmid = px.next_vmid(api)
    assert px.next_vmid(api, vmid) == vmid
    # LXC: create from template, in a pool, with tags
    upid = px.create_lxc(api, "pve1", vmid, TEMPLATE, hostname="web", rootfs="local-lvm:1",
                         memory=512, cores=1, net={0: "name=eth0,bridge=vmbr0,ip=dhcp"},
                         pool="lab", tags=["labkeeper", "web"], unprivileged=True)
    assert isinstance(upid, px.Upid) and upid.type == "vzcreate" and upid.node == "pve1"
    result = wait(api, upid)
    assert result.ok and result.exitstatus == "OK" and result.log[-1] == "TASK OK"
    assert any("extracting archive" in line for line in result.log)
    listed = px.list_guests(api, tag="web", pool="lab", node="pve1", gtype="lxc")
    assert [g.vmid for g in listed] == [vmid]
    assert listed[0].tags == ["labkeeper", "web"]
    assert px.find_guest(api, vmid) is not None
    # configure (PUT), config, status
    cfg = px.guest_config(api, "pve1", vmid, "lxc")
    assert px.configure(api, "pve1", vmid, "lxc", {"memory": 1024}, digest=cfg.digest) is None
    cfg = px.guest_config(api, "pve1", vmid, "lxc")
    assert cfg.values["memory"] == 1024 and cfg.hostname == "web"
    # disk grow
    assert wait(api, px.resize_disk(api, "pve1", vmid, "lxc", "rootfs", "+1G")).ok
    # power
    assert wait(api, px.start_guest(api, "pve1", vmid, "lxc")).ok
    assert px.guest_status(api, "pve1", vmid, "lxc").status == "running"
    # snapshots
    assert wait(api, px.create_snapshot(api, "pve1", vmid, "lxc", "before")).ok
    px.configure(api, "pve1", vmid, "lxc", {"memory": 2048})
    snaps = px.list_snapshots(api, "pve1", vmid, "lxc")
    assert [s.name for s in snaps] == ["before"] and snaps[0].snaptime
    assert wait(api, px.rollback_snapshot(api, "pve1", vmid, "lxc", "before")).ok
    assert px.guest_config(api, "pve1", vmid, "lxc").values["memory"] == 1024
    assert wait(api, px.delete_snapshot(api, "pve1", vmid, "lxc", "before")).ok
    assert px.list_snapshots(api, "pve1", vmid, "lxc") == []
    # backup with notes and retention, then the archive in storage content
    assert wait(api, px.start_guest(api, "pve1", vmid, "lxc")).ok
    dump = wait(api, px.vzdump(api, "pve1", vmids=[vmid], mode="snapshot", compress="zstd",
                               storage="local", notes_template="{{guestname}} nightly",
                               prune_backups={"keep-last": 2}))
    assert dump.ok and any("Finished Backup of VM" in line for line in dump.log)
    [backup] = px.backups(api, "pve1", "local", vmid=vmid)
    assert backup.volid.startswith(f"local:backup/vzdump-lxc-{vmid}-")
    assert backup.notes == "web nightly" and backup.size > 0
    assert wait(api, px.shutdown_guest(api, "pve1", vmid, "lxc", timeout=30)).ok
    # restore over the existing guest and to a new vmid
    assert wait(api, px.restore_lxc(api, "pve1", vmid, backup.volid, storage="local-lvm",
                                    force=True)).ok
    restored = next(_vmids)
    assert wait(api, px.restore_lxc(api, "pve1", restored, backup.volid,
                                    storage="local-lvm")).ok
    assert px.guest_config(api, "pve1", restored, "lxc").hostname == "web"
    # prune: dry run then for real; delete a volume
    wait(api, px.vzdump(api, "pve1", vmids=[vmid], storage="local"))
    marks = px.prune_dry_run(api, "pve1", "local", prune_backups={"keep-last": 1}, vmid=vmid)
    assert sorted(m.mark for m in marks) == ["keep", "remove"]
    assert wait(api, px.prune_backups(api, "pve1", "local", vmid=vmid,
                                      prune_backups={"keep-last": 1})).ok
    [kept] = px.backups(api, "pve1", "local", vmid=vmid)
    px.set_volume_attributes(api, "pve1", kept.volid, protected=True)  # updates' archives
    [marked] = px.backups(api, "pve1", "local", vmid=vmid)
    assert marked.protected
    px.set_volume_attributes(api, "pve1", kept.volid, protected=False)
    deleted = px.delete_volume(api, "pve1", kept.volid)
    assert deleted is not None and wait(api, deleted).ok
    assert px.backups(api, "pve1", "local", vmid=vmid) == []
    # stop and destroy
    assert wait(api, px.start_guest(api, "pve1", vmid, "lxc")).ok
    assert wait(api, px.stop_guest(api, "pve1", vmid, "lxc")).ok
    for gone in (vmid, restored):
        assert wait(api, px.destroy_guest(api, "pve1", gone, "lxc")).ok
    assert px.find_guest(api, vmid) is None

    # QEMU: linked clone of the template, full clone to another storage, configure, power
    linked, full = next(_vmids), next(_vmids)
    assert wait(api, px.clone_qemu(api, "pve1", QEMU_TEMPLATE, linked, name="linked",
                                   full=False)).ok
    clone = wait(api, px.clone_qemu(api, "pve1", QEMU_TEMPLATE, full, name="full", full=True,
                                    storage="local-lvm", target="pve1"))
    assert any("create full clone" in line for line in clone.log)
    assert "/" in px.guest_config(api, "pve1", linked, "qemu").values["scsi0"].split(",")[0]
    post = px.configure(api, "pve1", full, "qemu", {"cores": 2, "tags": ["vm"]},
                        asynchronous=True)
    assert post is not None and wait(api, post).ok
    px.configure(api, "pve1", full, "qemu", {"memory": "4096"}, delete=["tags"])
    cfg = px.guest_config(api, "pve1", full, "qemu")
    assert cfg.values["cores"] == 2 and cfg.values["memory"] == "4096" and cfg.tags == []
    assert wait(api, px.resize_disk(api, "pve1", full, "qemu", "scsi0", "+1G")).ok
    assert wait(api, px.start_guest(api, "pve1", full, "qemu")).ok
    assert px.guest_status(api, "pve1", full, "qemu").qmpstatus == "running"
    assert wait(api, px.create_snapshot(api, "pve1", full, "qemu", "s1")).ok
    assert [s.name for s in px.list_snapshots(api, "pve1", full, "qemu")] == ["s1"]
    assert wait(api, px.rollback_snapshot(api, "pve1", full, "qemu", "s1")).ok
    assert wait(api, px.delete_snapshot(api, "pve1", full, "qemu", "s1")).ok
    assert wait(api, px.start_guest(api, "pve1", full, "qemu")).ok
    assert wait(api, px.stop_guest(api, "pve1", full, "qemu")).ok
    assert wait(api, px.start_guest(api, "pve1", full, "qemu")).ok
    assert wait(api, px.shutdown_guest(api, "pve1", full, "qemu", force_stop=True)).ok
    # QEMU backup and restore to a new vmid
    assert wait(api, px.vzdump(api, "pve1", vmids=[full], mode="stop", storage="local")).ok
    [vma] = px.backups(api, "pve1", "local", vmid=full)
    assert vma.volid.endswith(".vma.zst")
    qrestored = next(_vmids)
    assert wait(api, px.restore_qemu(api, "pve1", qrestored, vma.volid,
                                     storage="local-lvm")).ok
    assert px.guest_config(api, "pve1", qrestored, "qemu").name == "full"
    for gone in (qrestored, full, linked):
        assert wait(api, px.destroy_guest(api, "pve1", gone, "qemu")).ok
    assert wait(api, px.delete_volume(api, "pve1", vma.volid)).ok  # type: ignore[arg-type]

    # backup jobs: create, read, update, list, delete
    px.create_backup_job(api, "lk-nightly", schedule="02:30", vmids=[QEMU_TEMPLATE],
                         storage="local", mode="snapshot", compress="zstd",
                         notes_template="{{guestname}}", prune_backups={"keep-daily": 7},
                         comment="labkeeper")
    job = px.get_backup_job(api, "lk-nightly")
    assert job.schedule == "02:30" and job.vmids == [QEMU_TEMPLATE] and job.next_run
    px.update_backup_job(api, "lk-nightly", schedule="sat 01:00", delete=["comment"])
    [listed_job] = [j for j in px.list_backup_jobs(api) if j.id == "lk-nightly"]
    assert listed_job.schedule == "sat 01:00" and listed_job.comment is None
    px.delete_backup_job(api, "lk-nightly")
    assert all(j.id != "lk-nightly" for j in px.list_backup_jobs(api))

    # tasks
    tasks = px.list_tasks(api, "pve1", vmid=vmid, typefilter="vzdump")
    assert tasks and all(t.type == "vzdump" and t.status == "OK" for t in tasks)
    assert px.task_status(api, tasks[0].upid).status == "stopped"
    ct = new_ct(api)
    lab.sim.faults.hang_tasks("vzstart", vmid=ct)
    hung = px.start_guest(api, "pve1", ct, "lxc")
    px.stop_task(api, hung)
    with pytest.raises(px.ProxmoxTaskError) as stopped:
        wait(api, hung)
    assert stopped.value.exitstatus == "interrupted by signal"
    assert wait(api, px.destroy_guest(api, "pve1", ct, "lxc")).ok

    mine = list(lab.sim.requests)[first:]
    assert [r for r in mine if r["status"] != 200] == []
    assert {(r["method"], r.get("template")) for r in mine} >= set(px.ADAPTER_CALLS)


def test_token_without_vm_backup_gets_403_permanent_on_vzdump(lab: Lab, api: Any) -> None:
    vmid = new_ct(api)
    nobackup = lab.api("nobackup")
    with pytest.raises(ServiceError) as info:
        px.vzdump(nobackup, "pve1", vmids=[vmid], storage="local")
    assert info.value.status == 403 and not info.value.transient
    assert "VM.Backup" in str(info.value)
    assert wait(api, px.destroy_guest(api, "pve1", vmid, "lxc")).ok


def test_list_guests_filters_by_node_type_and_excludes_templates(api: Any) -> None:
    a, b = new_ct(api, node="pve1", tags=["x"]), new_ct(api, node="pve2", tags=["x"])
    try:
        assert [g.vmid for g in px.list_guests(api, tag="x", node="pve2")] == [b]
        qemu = px.list_guests(api, gtype="qemu")
        assert QEMU_TEMPLATE in [g.vmid for g in qemu]
        assert QEMU_TEMPLATE not in [g.vmid for g in px.list_guests(api, templates=False)]
        assert {g.vmid for g in px.list_guests(api, tag="x")} == {a, b}
    finally:
        for vmid, node in ((a, "pve1"), (b, "pve2")):
            wait(api, px.destroy_guest(api, node, vmid, "lxc"))


# ------------------------------------------------------------------------------- waiting on tasks


def test_task_with_warnings_is_success_with_warning_count(lab: Lab, api: Any, faults) -> None:
    vmid = new_ct(api)
    faults.warn_tasks("vzstart", "systemd-networkd.service is masked", vmid=vmid)
    result = wait(api, px.start_guest(api, "pve1", vmid, "lxc"))
    assert result.ok and result.warnings == 1 and result.exitstatus == "WARNINGS: 1"
    assert result.log[-1] == "TASK WARNINGS: 1"
    assert any("systemd-networkd.service is masked" in line for line in result.log)
    wait(api, px.stop_guest(api, "pve1", vmid, "lxc"))
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


def _running(sim: Simulator, upid: px.Upid) -> Any:
    deadline = time.monotonic() + 5
    while upid.raw not in sim.tasks.runs:
        assert time.monotonic() < deadline, "task never started"
        time.sleep(0.005)
    return sim.tasks.runs[upid.raw]


def test_failed_vzdump_raises_task_error_with_job_errors_and_log_tail(api: Any, faults) -> None:
    vmid = new_ct(api)
    faults.fail_tasks("vzdump", "zstd: write error: No space left on device", vmid=vmid)
    upid = px.vzdump(api, "pve1", vmids=[vmid], storage="local")
    with pytest.raises(px.ProxmoxTaskError) as info:
        wait(api, upid)
    err = info.value
    assert err.exitstatus == "job errors" and err.upid == upid.raw
    assert err.log_tail[-1] == "TASK ERROR: job errors"
    assert any(f"ERROR: Backup of VM {vmid} failed - zstd" in line for line in err.log_tail)
    assert not is_transient(err)
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


def test_interrupted_task_raises_task_error(lab: Lab, api: Any, faults) -> None:
    vmid = new_ct(api)
    faults.hang_tasks("vzstart", vmid=vmid)
    upid = px.start_guest(api, "pve1", vmid, "lxc")
    _running(lab.sim, upid)
    lab.sim.tasks.stop_task(upid.raw)
    with pytest.raises(px.ProxmoxTaskError) as info:
        wait(api, upid)
    assert info.value.exitstatus == "interrupted by signal"
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


def test_hanging_task_times_out_with_upid_in_message(lab: Lab, api: Any, faults) -> None:
    vmid = new_ct(api)
    faults.hang_tasks("vzsnapshot", vmid=vmid)
    upid = px.create_snapshot(api, "pve1", vmid, "lxc", "hang")
    started = time.monotonic()
    with pytest.raises(TaskTimeout) as info:
        wait(api, upid, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 3
    assert isinstance(info.value, px.ProxmoxTaskTimeout) and info.value.upid == upid.raw
    assert upid.raw in str(info.value) and "may still be running" in str(info.value)
    assert is_transient(info.value)
    faults.clear()
    assert wait(api, upid).ok
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


def test_long_task_log_is_read_past_pve_default_of_50_lines(api: Any) -> None:
    vmids = [new_ct(api) for _ in range(4)]
    upid = px.vzdump(api, "pve1", vmids=vmids, storage="local")
    result = wait(api, upid)
    assert len(result.log) > 50  # ~15 lines per guest
    assert result.log[0].startswith("INFO: starting new backup job")
    assert result.log[-1] == "TASK OK"
    assert px.task_log(api, upid, page=7) == list(result.log)  # many pages, same lines
    for vmid in vmids:
        for vol in px.backups(api, "pve1", "local", vmid=vmid):
            wait(api, px.delete_volume(api, "pve1", vol.volid))  # type: ignore[arg-type]
        wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


# ------------------------------------------------------------------------------- API errors


def test_locked_guest_raises_guest_locked_transient_with_lock_name(api: Any, faults) -> None:
    vmid = new_ct(api)
    faults.hang_tasks("vzdump", vmid=vmid)
    dump = px.vzdump(api, "pve1", vmids=[vmid], storage="local")
    deadline = time.monotonic() + 5
    while px.guest_config(api, "pve1", vmid, "lxc").lock != "backup":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(px.GuestLocked) as info:
        px.create_snapshot(api, "pve1", vmid, "lxc", "during-backup")
    assert info.value.lock == "backup" and info.value.transient
    assert "CT is locked (backup)" in str(info.value)
    faults.clear()
    assert wait(api, dump).ok
    assert wait(api, px.create_snapshot(api, "pve1", vmid, "lxc", "after-backup")).ok
    for vol in px.backups(api, "pve1", "local", vmid=vmid):
        wait(api, px.delete_volume(api, "pve1", vol.volid))  # type: ignore[arg-type]
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


def test_503_is_transient_service_error(api: Any, faults) -> None:
    faults.api_errors(503, count=1)
    with pytest.raises(ServiceError) as info:
        px.node_names(api)
    assert info.value.status == 503 and info.value.transient
    assert px.node_names(api) == ["pve1", "pve2"]


def test_wait_for_task_rides_out_transient_503_while_polling(api: Any, faults) -> None:
    vmid = new_ct(api)
    faults.hang_tasks("vzstart", vmid=vmid)
    upid = px.start_guest(api, "pve1", vmid, "lxc")
    faults.api_errors(503, count=3)
    faults.release_event.set()
    assert wait(api, upid).ok
    faults.clear()
    wait(api, px.stop_guest(api, "pve1", vmid, "lxc"))
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))


def test_missing_guest_500_is_typed_service_error(api: Any) -> None:
    with pytest.raises(ServiceError, match="does not exist") as info:
        px.guest_config(api, "pve1", 899, "lxc")
    assert info.value.status == 500 and not isinstance(info.value, px.GuestLocked)


def test_rejected_parameter_is_400_permanent_on_the_shared_simulator(
        pvesim: Simulator, pvesim_credentials: Any, tmp_path: Path) -> None:
    """Deliberately bad requests go to the session simulator, so the audit below stays
    about well-formed calls."""
    secret = tmp_path / "tok"
    secret.write_text(pvesim_credentials.token_secret)
    spec = Proxmox.model_validate({
        "host": "127.0.0.1", "port": pvesim.port, "token_id": "labkeeper@pve!ci",
        "token_secret": f"file:{secret}", "tls": {"ca_file": pvesim.ca_file},
        "nodes": [{"name": "pve1"}]})
    api = px.connect(spec)
    with pytest.raises(ServiceError) as info:
        px.next_vmid(api, QEMU_TEMPLATE)  # taken
    assert info.value.status == 400 and not info.value.transient
    assert "already exists" in str(info.value)
    with pytest.raises(ServiceError) as info:
        px.vzdump(api, "pve1", vmids=[QEMU_TEMPLATE], mode="snapshot",
                  prune_backups="keep-often=1")
    assert info.value.status == 400 and "prune-backups" in str(info.value)


# ------------------------------------------------------------------------------- request audit


def _template_regex(template: str) -> re.Pattern[str]:
    out = "/api2/json"
    for seg in template.strip("/").split("/"):
        if seg == "{volume}":
            out += "/.+"
        elif seg.startswith("{"):
            out += "/[^/]+"
        elif seg:
            out += "/" + re.escape(seg)
    return re.compile(out + r"\Z")


def _declared(name: str, properties: dict[str, Any]) -> bool:
    if name in properties:
        return True
    match = re.fullmatch(r"([a-z]+)(\d+)", name)
    if match and f"{match.group(1)}[n]" in properties:
        return int(match.group(2)) < FAMILY_CAPS.get(match.group(1), 256)
    return False


def test_zz_every_recorded_adapter_request_conforms_to_the_structure_file(
        lab: Lab, api: Any) -> None:
    """Runs last in this module: audits every request the adapter sent to this simulator
    (all tests above; run alone, at least the calls made here)."""
    vmid = new_ct(api)
    px.list_guests(api)
    wait(api, px.destroy_guest(api, "pve1", vmid, "lxc"))
    paths = load_structure()["paths"]
    regexes = {t: _template_regex(t) for t in paths}
    records = [r for r in lab.sim.requests if "/_sim/" not in r["path"]]
    assert len(records) >= 5
    problems = []
    for rec in records:
        if rec["status"] in (400, 501):
            problems.append(f"{rec['method']} {rec['path']}: HTTP {rec['status']}")
        candidates = [t for t, rx in regexes.items() if rx.match(rec["path"])]
        if not candidates:
            problems.append(f"{rec['method']} {rec['path']}: no such path")
            continue
        template = rec.get("template") or candidates[0]
        if template not in candidates:
            problems.append(f"{rec['path']}: simulator matched {template}, not {candidates}")
        endpoint = paths[template].get(rec["method"])
        if endpoint is None:
            problems.append(f"{rec['method']} {template}: method not in structure")
            continue
        props = (endpoint.get("parameters") or {}).get("properties") or {}
        for name in rec.get("params") or {}:
            if not _declared(name, props):
                problems.append(f"{rec['method']} {template}: undeclared parameter {name}")
        if ("{volume}" in template or "{upid}" in template) and ":" in rec["path"]:
            problems.append(f"{rec['path']}: volume/UPID not percent-encoded")
        if (rec["method"], template) not in px.ADAPTER_CALLS and template != "/access/ticket":
            problems.append(f"{rec['method']} {template}: not listed in ADAPTER_CALLS")
    assert problems == []
