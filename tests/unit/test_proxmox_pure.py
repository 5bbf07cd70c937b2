"""Pure parts of the Proxmox adapter: UPIDs, request building, exit status, privileges."""

from __future__ import annotations

import json

import pytest

from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, is_transient
from labkeeper.pvesim.schema import load_structure
from tests.recorded import PVE

FIXTURES = PVE


# ------------------------------------------------------------------------------- UPIDs


def test_upid_from_pve9_task_list_parses_every_field() -> None:
    upid = px.parse_upid("UPID:pve1:0020C066:042DF204:69C26EB0:vzdump::root@pam:")
    assert (upid.node, upid.pid, upid.pstart, upid.starttime) == (
        "pve1", 0x20C066, 0x42DF204, 0x69C26EB0)
    assert (upid.type, upid.id, upid.user) == ("vzdump", "", "root@pam")
    assert str(upid) == upid.raw


def test_upid_with_token_user_and_colon_in_id_keeps_id_whole() -> None:
    raw = "UPID:pve2:0001A2B3:00ABCDEF:6700AA00:imgdel:local:backup/x.tar.zst:lk@pve!ci:"
    upid = px.parse_upid(raw)
    assert upid.id == "local:backup/x.tar.zst"
    assert upid.user == "lk@pve!ci"
    assert upid.type == "imgdel"


def test_upid_pstart_longer_than_eight_digits_parses() -> None:
    upid = px.parse_upid("UPID:n1:00000001:1FFFFFFFF:6700AA00:qmstart:100:root@pam:")
    assert upid.pstart == 0x1FFFFFFFF


@pytest.mark.parametrize("text", [
    "", "OK", "UPID:pve1:zz:00:00:vzdump::root@pam:",
    "UPID:pve1:0020C066:042DF204:69C26EB0:vzdump::root@pam",  # no trailing colon
    "TASK:pve1:0020C066:042DF204:69C26EB0:vzdump::root@pam:",
])
def test_malformed_upid_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a PVE UPID"):
        px.parse_upid(text)


def test_upids_from_real_task_list_fixtures_parse() -> None:
    for name in ("node-tasks-list-pve6.4.cpx.json", "node-tasks-list-pve9.1.ha.json"):
        data = json.loads((FIXTURES / name).read_text())
        data = data.get("data", data) if isinstance(data, dict) else data
        for entry in data:
            upid = px.parse_upid(entry["upid"])
            assert upid.node == entry["node"]
            assert upid.type == entry["type"]
            summary = px.TaskSummary.model_validate(entry)
            assert summary.upid == entry["upid"]


# ------------------------------------------------------------------------------- requests


def test_volid_is_percent_encoded_in_the_path_and_kept_readable_for_messages() -> None:
    volid = "local:backup/vzdump-lxc-101-2025_01_02-03_04_05.tar.zst"
    req = px.delete_volume_request("pve1", volid)
    assert req.method == "DELETE"
    assert req.template == "/nodes/{node}/storage/{storage}/content/{volume}"
    assert req.path == ("/nodes/pve1/storage/local/content/"
                        "local%3Abackup%2Fvzdump-lxc-101-2025_01_02-03_04_05.tar.zst")
    assert req.display.endswith(volid)


def test_upid_is_percent_encoded_in_task_paths() -> None:
    upid = px.parse_upid("UPID:pve1:0020C066:042DF204:69C26EB0:vzdump:101:lk@pve!ci:")
    req = px.task_log_request(upid, start=50, limit=50)
    assert req.path.startswith("/nodes/pve1/tasks/UPID%3Apve1%3A")
    assert "%21ci%3A" in req.path
    assert req.params == {"start": 50, "limit": 50}


def test_vzdump_request_uses_pve_parameter_names_and_drops_unset_ones() -> None:
    req = px.vzdump_request("pve1", vmids=[101, 102], mode="snapshot", compress="zstd",
                            storage="local", notes_template="{{guestname}}",
                            prune_backups={"keep-last": 3, "keep-daily": 7}, protected=False)
    assert req.params == {"vmid": "101,102", "mode": "snapshot", "compress": "zstd",
                          "storage": "local", "notes-template": "{{guestname}}",
                          "prune-backups": "keep-last=3,keep-daily=7", "protected": 0}


def test_vzdump_needs_exactly_one_selection() -> None:
    with pytest.raises(ValueError):
        px.vzdump_request("pve1")
    with pytest.raises(ValueError):
        px.vzdump_request("pve1", vmids=[1], pool="lab")
    assert px.vzdump_request("pve1", pool="lab", exclude=[5]).params["exclude"] == "5"


def test_restore_requests_follow_pve_conventions() -> None:
    lxc = px.restore_lxc_request("pve1", 120, "local:backup/a.tar.zst", storage="local-lvm",
                                 force=True)
    assert lxc.template == "/nodes/{node}/lxc"
    assert lxc.params["restore"] == 1 and lxc.params["ostemplate"] == "local:backup/a.tar.zst"
    assert lxc.params["force"] == 1
    qemu = px.restore_qemu_request("pve1", 130, "local:backup/b.vma.zst")
    assert qemu.params == {"vmid": 130, "archive": "local:backup/b.vma.zst"}


def test_clone_refuses_storage_for_linked_clone() -> None:
    with pytest.raises(ValueError, match="full clone"):
        px.clone_qemu_request("pve1", 9000, 200, full=False, storage="local-lvm")
    req = px.clone_qemu_request("pve1", 9000, 200, full=True, target="pve2", storage="x")
    assert req.params == {"newid": 200, "full": 1, "target": "pve2", "storage": "x"}


def test_configure_builds_put_or_async_post_with_delete_list() -> None:
    req = px.configure_request("pve1", 101, "lxc", {"memory": 1024, "tags": ["a", "b"]},
                               delete=["description", "mp0"])
    assert req.method == "PUT"
    assert req.params == {"memory": 1024, "tags": "a;b", "delete": "description,mp0"}
    post = px.configure_request("pve1", 9001, "qemu", {"cores": 2}, asynchronous=True)
    assert post.method == "POST" and post.template == "/nodes/{node}/qemu/{vmid}/config"
    with pytest.raises(ValueError, match="set and delete"):
        px.configure_request("pve1", 101, "lxc", {"memory": 1}, delete=["memory"])
    with pytest.raises(ValueError):
        px.configure_request("pve1", 101, "lxc", {}, asynchronous=True)


def test_power_and_destroy_requests() -> None:
    req = px.power_request("pve2", 7, "qemu", "shutdown", timeout=60, force_stop=True)
    assert req.path == "/nodes/pve2/qemu/7/status/shutdown"
    assert req.params == {"timeout": 60, "forceStop": 1}
    with pytest.raises(ValueError):
        px.power_request("pve2", 7, "qemu", "start", timeout=5)
    with pytest.raises(ValueError):
        px.power_request("pve2", 7, "docker", "start")  # type: ignore[arg-type]
    gone = px.destroy_request("pve1", 7, "lxc")
    assert gone.params == {"purge": 1, "destroy-unreferenced-disks": 1}


def test_retention_formatting_is_pve_property_string() -> None:
    assert px.format_retention({"keep-daily": 7, "keep-last": 2}) == "keep-last=2,keep-daily=7"
    assert px.format_retention("keep-last=1") == "keep-last=1"
    assert px.format_retention(None) is None
    with pytest.raises(ValueError):
        px.format_retention({"keep-forever": 1})
    with pytest.raises(ValueError):
        px.format_retention({"keep-last": -1})


def test_backup_job_requests_map_underscores_to_pve_names() -> None:
    req = px.backup_job_create_request("nightly", schedule="02:30", vmids=[101],
                                       storage="local", notes_template="{{guestname}}",
                                       prune_backups={"keep-last": 3}, enabled=True)
    assert req.params == {"id": "nightly", "schedule": "02:30", "vmid": "101",
                          "storage": "local", "notes-template": "{{guestname}}",
                          "prune-backups": "keep-last=3", "enabled": 1}
    upd = px.backup_job_update_request("nightly", delete=["comment"], mode="stop")
    assert upd.path == "/cluster/backup/nightly"
    assert upd.params == {"mode": "stop", "delete": "comment"}


def test_path_values_must_match_the_template() -> None:
    with pytest.raises(ValueError):
        px.api_request("GET", "/nodes/{node}/tasks")


def test_every_request_builder_targets_a_listed_adapter_call() -> None:
    upid = px.parse_upid("UPID:pve1:00000001:00000002:00000003:vzdump::root@pam:")
    built = [
        px.version_request(), px.nodes_request(), px.resources_request(), px.nextid_request(),
        px.create_lxc_request("n", 1, "t"), px.restore_lxc_request("n", 1, "s:v"),
        px.restore_qemu_request("n", 1, "s:v"), px.clone_qemu_request("n", 1, 2),
        px.vzdump_request("n", all_guests=True), px.storage_content_request("n", "s"),
        px.delete_volume_request("n", "s:v"), px.prune_dry_run_request("n", "s"),
        px.volume_attributes_request("n", "s:v", protected=True),
        px.prune_request("n", "s", vmid=1), px.backup_jobs_request(),
        px.backup_job_get_request("j"), px.backup_job_create_request("j", schedule="daily",
                                                                     all_guests=True),
        px.backup_job_update_request("j"), px.backup_job_delete_request("j"),
        px.tasks_request("n"), px.task_status_request(upid), px.task_log_request(upid),
        px.stop_task_request(upid),
        px.configure_request("n", 1, "qemu", {}, asynchronous=True),
    ]
    for gtype in ("lxc", "qemu"):
        built += [
            px.guest_config_request("n", 1, gtype), px.guest_status_request("n", 1, gtype),
            px.configure_request("n", 1, gtype, {}), px.destroy_request("n", 1, gtype),
            px.resize_request("n", 1, gtype, "rootfs" if gtype == "lxc" else "scsi0", "+1G"),
            px.snapshot_list_request("n", 1, gtype),
            px.snapshot_create_request("n", 1, gtype, "s"),
            px.snapshot_rollback_request("n", 1, gtype, "s"),
            px.snapshot_delete_request("n", 1, gtype, "s"),
            *(px.power_request("n", 1, gtype, a) for a in ("start", "stop", "shutdown")),
        ]
    assert {(r.method, r.template) for r in built} == set(px.ADAPTER_CALLS)


# ------------------------------------------------------------------------------- models


def test_guest_models_read_real_cluster_resources_tolerantly() -> None:
    data = json.loads((FIXTURES / "cluster-resources.json").read_text())
    data = data.get("data", data) if isinstance(data, dict) else data
    guests = [px.Guest.model_validate(e) for e in data if e.get("type") in ("lxc", "qemu")]
    assert guests and all(g.node for g in guests)
    picked = px.filter_guests(guests, gtype="lxc")
    assert all(g.type == "lxc" for g in picked)
    assert [g.vmid for g in picked] == sorted(g.vmid for g in picked)


def test_guest_tags_are_split_and_filters_combine() -> None:
    guests = [
        px.Guest(vmid=2, type="lxc", node="a", tags="db;prod", pool="lab"),
        px.Guest(vmid=1, type="qemu", node="b", tags=["prod"]),
        px.Guest(vmid=3, type="lxc", node="a", template=True),
    ]
    assert guests[0].tags == ["db", "prod"]
    assert [g.vmid for g in px.filter_guests(guests, tag="prod")] == [1, 2]
    assert [g.vmid for g in px.filter_guests(guests, node="a", templates=False)] == [2]
    assert [g.vmid for g in px.filter_guests(guests, pool="lab", gtype="lxc")] == [2]


def test_backup_job_model_reads_real_job_list() -> None:
    data = json.loads((FIXTURES / "cluster-backup-jobs.cpx.json").read_text())
    data = data.get("data", data) if isinstance(data, dict) else data
    jobs = [px.BackupJob.model_validate(j) for j in data]
    assert jobs and all(j.id for j in jobs)
    assert any(j.next_run for j in jobs)


def test_storage_volume_model_reads_real_backup_content() -> None:
    data = json.loads((FIXTURES / "storage-content-backup-pbs.cpx.json").read_text())
    data = data.get("data", data) if isinstance(data, dict) else data
    vols = [px.StorageVolume.model_validate(v) for v in data]
    assert vols and all(v.volid and v.content == "backup" for v in vols)


# ------------------------------------------------------------------------------- tasks


@pytest.mark.parametrize(("exitstatus", "expected"), [
    ("OK", (True, 0)), ("WARNINGS: 3", (True, 3)), ("job errors", (False, 0)),
    ("interrupted by signal", (False, 0)), ("unexpected status", (False, 0)),
    ("", (False, 0)), (None, (False, 0)),
])
def test_exitstatus_classification(exitstatus: str | None, expected: tuple[bool, int]) -> None:
    assert px.classify_exitstatus(exitstatus) == expected


def test_poll_delays_back_off_and_cap() -> None:
    gen = px.poll_delays(0.2, 5.0, 2.0)
    delays = [next(gen) for _ in range(8)]
    assert delays[:3] == [0.2, 0.4, 0.8]
    assert max(delays) == 5.0 and delays[-1] == 5.0


UPID = px.parse_upid("UPID:pve1:0020C066:042DF204:69C26EB0:vzdump:101:root@pam:")


def test_task_result_with_warnings_is_success() -> None:
    status = px.TaskStatus(status="stopped", exitstatus="WARNINGS: 2")
    result = px.task_result(UPID, status, ["a", "", "TASK WARNINGS: 2"], 1.5)
    assert result.ok and result.warnings == 2 and result.tail(1) == ("TASK WARNINGS: 2",)


def test_task_failure_carries_exitstatus_and_log_tail() -> None:
    log = [f"INFO: line {i}" for i in range(40)] + [
        "ERROR: Backup of VM 101 failed - some disk error", "INFO: Backup job finished with errors",
        "", "TASK ERROR: job errors"]
    status = px.TaskStatus(status="stopped", exitstatus="job errors")
    with pytest.raises(px.ProxmoxTaskError) as info:
        px.task_result(UPID, status, log, 2.0)
    err = info.value
    assert err.exitstatus == "job errors"
    assert len(err.log_tail) == 20 and err.log_tail[-1] == "TASK ERROR: job errors"
    assert "some disk error" in str(err) and UPID.raw in str(err)
    assert not is_transient(err)


def test_task_failure_because_of_a_lock_is_transient() -> None:
    status = px.TaskStatus(status="stopped", exitstatus="job errors")
    log = ["ERROR: Backup of VM 101 failed - CT is locked (snapshot)", "TASK ERROR: job errors"]
    with pytest.raises(px.ProxmoxTaskError) as info:
        px.task_result(UPID, status, log, 0.1)
    assert is_transient(info.value)


def test_wait_for_task_times_out_on_a_fake_clock_without_real_sleeping() -> None:
    """The clock and sleep are injectable; a task that never stops raises TaskTimeout."""
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    class Api:  # stands in for proxmoxer only (not our code): always "running"
        def __call__(self, path: str) -> Api:
            return self

        def get(self, **params: object) -> dict:
            return {"status": "running"}

    with pytest.raises(px.ProxmoxTaskTimeout) as info:
        px.wait_for_task(Api(), UPID, timeout=30, poll=0.2, clock=lambda: now[0], sleep=sleep)
    assert info.value.upid == UPID.raw and "may still be running" in str(info.value)
    assert is_transient(info.value)
    assert slept[0] == 0.2 and max(slept) <= 5.0 and sum(slept) == pytest.approx(30)


def test_lock_name_is_read_from_pve_wording() -> None:
    assert px.lock_name("CT is locked (backup)") == "backup"
    assert px.lock_name("VM is locked (snapshot-delete)") == "snapshot-delete"
    assert px.lock_name("CT 101 already running") is None


# ------------------------------------------------------------------------------- privileges


def test_required_privileges_equal_the_derivation_from_the_structure_file() -> None:
    derived = px.derive_privileges(load_structure(), px.ADAPTER_CALLS)
    assert tuple(sorted(derived)) == px.REQUIRED_PRIVILEGES


def test_every_adapter_call_exists_in_the_structure_file() -> None:
    paths = load_structure()["paths"]
    for method, template in px.ADAPTER_CALLS:
        assert method in paths.get(template, {}), (method, template)


def test_derivation_rules_for_and_or_any() -> None:
    structure = {"paths": {
        "/a": {"POST": {"permissions": {"check": [
            "and", ["perm", "/vms/{vmid}", ["VM.Clone"]],
            ["or", ["perm", "/pool/{pool}", ["VM.Allocate"], "require_param", "pool"],
             ["perm", "/vms/{newid}", ["VM.Allocate"]]]]}}},
        "/b": {"GET": {"permissions": {"check": [
            "perm", "/s", ["Datastore.Audit", "Datastore.AllocateSpace"], "any", 1]}}},
        "/c": {"GET": {"permissions": {"user": "all"}}},
    }}
    assert px.derive_privileges(structure, [("POST", "/a")]) == {"VM.Clone", "VM.Allocate"}
    assert px.derive_privileges(structure, [("GET", "/b")]) == {
        "Datastore.Audit", "Datastore.AllocateSpace"}
    assert px.derive_privileges(structure, [("GET", "/c")]) == frozenset()


# ------------------------------------------------------------------------------- config


class _Tls:
    def __init__(self, verify: bool = True, ca_file: str | None = None,
                 fingerprint: str | None = None) -> None:
        self.verify, self.ca_file, self.fingerprint = verify, ca_file, fingerprint


def test_unverified_tls_without_fingerprint_is_refused() -> None:
    with pytest.raises(ConfigError, match="refusing an unverified connection"):
        px._tls_verify(_Tls(verify=False))
    assert px._tls_verify(_Tls(ca_file="/ca.pem")) == ("/ca.pem", None)
    assert px._tls_verify(_Tls()) == (True, None)


def test_bad_fingerprint_and_token_id_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        px.normalise_fingerprint("AB:CD")
    assert px.normalise_fingerprint("AB:" * 31 + "AB") == "ab" * 32
    with pytest.raises(ConfigError):
        px.split_token_id("labkeeper@pve")
    assert px.split_token_id("labkeeper@pve!ci") == ("labkeeper@pve", "ci")
