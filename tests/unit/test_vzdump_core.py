"""Pure parts of labkeeper.vzdump: selection, plan, log parsing, verification, native jobs."""

from __future__ import annotations

import json
import threading
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from labkeeper import proxmox as px
from labkeeper import vzdump as vz
from labkeeper.errors import TaskTimeout
from labkeeper.inventory import PruneRetention, Selection, VzdumpJob
from labkeeper.pvesim.calendar import parse_calendar_event
from tests.recorded import PVE

FIXTURES = PVE


def g(vmid: int, node: str = "pve1", tags: str = "", pool: str | None = None,
      gtype: str = "lxc", lock: str | None = None) -> px.Guest:
    return px.Guest.model_validate({"vmid": vmid, "type": gtype, "node": node,
                                    "name": f"g{vmid}", "tags": tags, "pool": pool,
                                    "lock": lock})


CLUSTER = [g(100, "pve1", "web;critical"), g(101, "pve1", "db"), g(102, "pve2", "critical"),
           g(103, "pve2", "", "media"), g(104, "pve3", "critical;nobackup"),
           g(105, "pve3", gtype="qemu")]


def test_tags_select_any_tag_and_exclude_tags_remove():
    r = vz.resolve_selection(Selection(tags=["critical"], exclude_tags=["nobackup"]), CLUSTER)
    assert [t.vmid for t in r.targets] == [100, 102]
    assert r.warnings == ()


def test_all_with_excludes_and_a_node_limit():
    r = vz.resolve_selection(Selection(all=True, exclude=[101], node="pve1"), CLUSTER)
    assert [t.vmid for t in r.targets] == [100]


def test_only_a_node_selects_every_guest_on_it():
    r = vz.resolve_selection(Selection(node="pve3"), CLUSTER)
    assert [(t.vmid, t.type) for t in r.targets] == [(104, "lxc"), (105, "qemu")]


def test_vmids_names_and_pool_are_a_union_and_missing_vmids_are_reported():
    r = vz.resolve_selection(Selection(vmids=[101, 999], guests=["media"], pool="media"),
                             CLUSTER, {"media": 103})
    assert [t.vmid for t in r.targets] == [101, 103]
    assert r.missing == (999,)
    assert any("999" in w for w in r.warnings)


def test_a_selection_matching_nothing_warns():
    r = vz.resolve_selection(Selection(tags=["nope"]), CLUSTER)
    assert r.targets == () and "matched no guest" in r.warnings[0]


def test_node_queues_and_the_ideal_makespan():
    targets = vz.resolve_selection(Selection(all=True), CLUSTER).targets
    queues = vz.node_queues(targets)
    assert {n: [t.vmid for t in q] for n, q in queues.items()} == {
        "pve1": [100, 101], "pve2": [102, 103], "pve3": [104, 105]}
    many = [vz.Target(i, f"pve{i % 3 + 1}", "lxc") for i in range(60)]
    assert vz.ideal_makespan(many, 2.0) == 40.0
    assert vz.ideal_makespan(many, 2.0, max_per_node=3) == 14.0


@pytest.mark.parametrize(("gtype", "compress", "fmt"), [
    ("lxc", "zstd", "tar.zst"), ("qemu", "zstd", "vma.zst"), ("lxc", "gzip", "tar.gz"),
    ("qemu", "lzo", "vma.lzo"), ("lxc", "0", "tar")])
def test_expected_format(gtype, compress, fmt):
    assert vz.expected_format(gtype, compress) == fmt


def test_notes_render_like_pve_and_cluster_matches_anything():
    assert vz.render_notes("{{guestname}} on {{node}}\\n{{vmid}}", guestname="web",
                           vmid=100, node="pve1") == "web on pve1\n100"
    assert vz.notes_match("{{guestname}}@{{cluster}}", "web@homelab", guestname="web",
                          vmid=1, node="n")
    assert not vz.notes_match("{{guestname}}", "other", guestname="web", vmid=1, node="n")


def test_parse_log_of_a_real_ok_vzdump():
    log = vz.parse_log((FIXTURES / "vzdump-lxc-stop-zstd-ok.log").read_text().splitlines())
    assert log.archive_path == "/mnt/pve/a11-hdd/dump/vzdump-lxc-999-2026_02_13-15_33_59.tar.zst"
    assert log.archive_size == "245MB"
    assert log.finished_ok and log.errors == ()


def test_parse_log_of_a_real_failed_vzdump_names_the_error_and_external_vms():
    text = (FIXTURES / "cmk-2021-01-17-vzdump-lxc-snapshot-zstd-cifs-failed.log").read_text()
    log = vz.parse_log(text.splitlines())
    assert not log.finished_ok
    assert log.errors and log.errors[0].startswith("Backup of VM 119 failed - command")
    assert log.skipped_external == (112, 123)


def test_parse_log_of_the_2020_wording_without_vzdump():
    log = vz.parse_log(["INFO: creating archive '/var/lib/vz/dump/vzdump-qemu-1-x.vma.lzo'"])
    assert log.archive_path == "/var/lib/vz/dump/vzdump-qemu-1-x.vma.lzo"


def vol(volid: str, size: int = 1000, vmid: int = 100, fmt: str = "tar.zst",
        notes: str = "g100", ctime: int = 10) -> px.StorageVolume:
    return px.StorageVolume(volid=volid, content="backup", format=fmt, size=size, vmid=vmid,
                            notes=notes, ctime=ctime)


NEW = "local:backup/vzdump-lxc-100-2025_01_02-01_00_00.tar.zst"
OLD = "local:backup/vzdump-lxc-100-2025_01_01-01_00_00.tar.zst"


def _verify(new, previous=None, **kw):
    args = {"vmid": 100, "gtype": "lxc", "compress": "zstd", "previous": previous,
            "min_size_ratio": 0.5, "notes_template": "{{guestname}}", "guestname": "g100",
            "node": "pve1"}
    args.update(kw)
    return vz.verify_archive(new, **args)


def test_a_good_new_archive_verifies():
    assert _verify(vol(NEW), vol(OLD)) == []


@pytest.mark.parametrize(("new", "previous", "needle"), [
    (None, None, "no new archive"),
    (vol(NEW, size=0), None, "size is 0"),
    (vol(NEW, size=400), vol(OLD, size=1000), "less than 0.5"),
    (vol(NEW, fmt="tar.gz"), None, "format"),
    (vol(NEW, notes="something else"), None, "notes"),
    (vol(NEW, vmid=101), None, "belongs to vmid 101"),
])
def test_a_bad_archive_fails_verification(new, previous, needle):
    problems = _verify(new, previous)
    assert any(needle in p for p in problems), problems


def test_the_archive_named_in_the_log_must_be_the_listed_one():
    log = vz.VzdumpLog(archive_path="/x/dump/vzdump-lxc-100-2025_01_03-01_00_00.tar.zst")
    assert any("the log wrote" in p for p in _verify(vol(NEW), log=log))


def test_pick_new_archive_prefers_the_one_the_log_names():
    after = [vol(OLD, ctime=1), vol(NEW, ctime=5),
             vol("local:backup/vzdump-lxc-100-2025_01_03-01_00_00.tar.zst", ctime=9)]
    picked = vz.pick_new_archive([OLD], after, 100, "/d/" + NEW.split("/")[-1])
    assert picked is not None and picked.volid == NEW
    assert vz.pick_new_archive([OLD], after, 100).volid.endswith("2025_01_03-01_00_00.tar.zst")
    assert vz.pick_new_archive([OLD, NEW], [vol(OLD), vol(NEW)], 100) is None


def test_period_start_is_the_last_fire_time_in_the_lab_time_zone():
    zone = ZoneInfo("Europe/Berlin")
    now = datetime(2025, 5, 5, 12, 0, tzinfo=zone)
    assert vz.period_start("30 1 * * 6", "Europe/Berlin", now) == datetime(2025, 5, 3, 1, 30,
                                                                           tzinfo=zone)
    exact = datetime(2025, 5, 3, 1, 30, 0, tzinfo=zone)
    assert vz.period_start("30 1 * * 6", "Europe/Berlin", exact) == exact


def test_backed_up_since_finds_only_archives_of_this_period():
    vols = [vol(OLD, ctime=100), vol(NEW, ctime=200)]
    assert vz.backed_up_since(vols, 100, 150).volid == NEW
    assert vz.backed_up_since(vols, 100, 250) is None


@pytest.mark.parametrize(("cron", "calendar"), [
    ("30 1 * * 6", "sat 01:30"),
    ("15 1 * * *", "01:15"),
    ("0 2 * * 1-5", "mon,tue,wed,thu,fri 02:00"),
    ("*/15 * * * *", "*:00,15,30,45"),
    ("0 3 1 * *", "*-*-01 03:00"),
    ("0 4 * * sun", "sun 04:00"),
])
def test_cron_becomes_a_pve_calendar_event_that_fires_at_the_same_times(cron, calendar):
    from cronsim import CronSim

    assert vz.cron_to_calendar(cron) == calendar
    event = parse_calendar_event(calendar)
    start = datetime(2025, 1, 1, 0, 0, tzinfo=ZoneInfo("UTC"))
    it = CronSim(cron, start)
    at = start
    for _ in range(5):
        want = next(it)
        got = event.next_after(at)
        assert got == want
        at = want


def test_cron_with_both_day_fields_has_no_calendar_equivalent():
    with pytest.raises(ValueError, match="no PVE calendar equivalent"):
        vz.cron_to_calendar("0 1 1 * 1")


def _job(**kw) -> VzdumpJob:
    base = {"name": "nightly", "selection": {"tags": ["critical"]}, "storage": "local",
            "retention": {"keep_daily": 7, "keep_weekly": 2}, "schedule": "15 1 * * *",
            "native": True}
    base.update(kw)
    return VzdumpJob.model_validate(base)


def test_native_plan_creates_resolving_tags_to_vmids():
    plan = vz.plan_native_jobs([_job()], [], CLUSTER, {})
    (change,) = plan
    assert change.action == "create" and change.job_id == "labkeeper-nightly"
    assert change.params["vmid"] == "100,102,104"
    assert change.params["schedule"] == "01:15"
    assert change.params["prune-backups"] == "keep-daily=7,keep-weekly=2"
    assert any("re-run sync-jobs" in n for n in change.notes)


def test_native_plan_is_unchanged_for_the_same_job_and_updates_a_difference():
    params, _ = vz.native_job_params(_job(), CLUSTER, {})
    existing = px.BackupJob.model_validate({"id": "labkeeper-nightly", **params,
                                            "prune-backups": {"keep-daily": 7,
                                                              "keep-weekly": 2}})
    assert [c.action for c in vz.plan_native_jobs([_job()], [existing], CLUSTER, {})] == [
        "unchanged"]
    changed = vz.plan_native_jobs([_job(mode="stop")], [existing], CLUSTER, {})
    assert changed[0].action == "update" and changed[0].changes == ("mode: snapshot → stop",)


def test_native_plan_deletes_only_our_jobs_and_never_the_users():
    ours = px.BackupJob.model_validate({"id": "labkeeper-old", "schedule": "sun 01:00"})
    theirs = px.BackupJob.model_validate({"id": "backup-1234", "schedule": "sun 01:00"})
    plan = vz.plan_native_jobs([_job(native=False)], [ours, theirs], CLUSTER, {})
    assert [(c.action, c.job_id) for c in plan] == [("delete", "labkeeper-old")]


def test_native_params_for_all_with_excludes_and_a_pool():
    params, _ = vz.native_job_params(_job(selection={"all": True, "exclude": [101]}),
                                     CLUSTER, {})
    assert params["all"] == 1 and params["exclude"] == "101" and "vmid" not in params
    params, _ = vz.native_job_params(_job(selection={"pool": "media"}), CLUSTER, {})
    assert params["pool"] == "media"


def test_the_fixture_backup_jobs_parse_as_backup_jobs():
    raw = json.loads((FIXTURES / "cluster-backup-jobs.cpx.json").read_text())
    jobs = [px.BackupJob.model_validate(j) for j in raw]
    assert jobs and all(j.id for j in jobs)
    assert vz.plan_native_jobs([], jobs, CLUSTER, {}) == []


def test_retention_string_comes_from_the_inventory_policy():
    assert PruneRetention(keep_last=2, keep_weekly=4).as_pve() == "keep-last=2,keep-weekly=4"


# ---------------------------------------------------------------------- polling and node slots


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_polls_come_at_a_fraction_of_the_time_watched_between_the_floor_and_the_cap():
    clock = _Clock()
    sleep = vz.proportional_sleep(fraction=0.05, floor=0.05, clock=clock, sleep=clock.sleep)
    sleep(0.2)  # just started: the floor, not the adapter's 0.2
    assert clock.slept[-1] == pytest.approx(0.05)
    clock.now = 60.0
    sleep(5.0)  # a minute in: 5 % of it
    assert clock.slept[-1] == pytest.approx(3.0)
    clock.now = 1000.0
    sleep(5.0)  # long-running: the adapter's delay (poll_max) is the cap
    assert clock.slept[-1] == pytest.approx(5.0)
    clock.now = 1000.0 + 0.01
    sleep(0.0)  # never negative, never more than asked
    assert clock.slept[-1] == 0.0


def test_a_node_slot_hands_off_when_taken_and_the_next_guest_waits_for_its_release():
    slots = threading.BoundedSemaphore(1)
    first, second = vz.NodeSlot("pve1", slots), vz.NodeSlot("pve1", slots)
    entered = threading.Event()

    def take_second() -> None:
        with second:
            entered.set()

    with first:
        assert first.handoff.is_set()
        t = threading.Thread(target=take_second)
        t.start()
        assert not entered.wait(0.2), "two guests held one node's only slot"
        assert not second.handoff.is_set()
    assert entered.wait(5)
    t.join(5)
    assert second.handoff.is_set()
    with first:  # a retried attempt takes a slot again (released by then)
        pass


def test_a_guest_that_never_needs_its_slot_hands_off_too():
    slot = vz.NodeSlot("pve1", threading.BoundedSemaphore(1))
    slot.give_up()
    assert slot.handoff.is_set()


def test_waiting_too_long_for_a_node_slot_is_a_transient_timeout():
    slots = threading.BoundedSemaphore(1)
    holder = vz.NodeSlot("pve2", slots)
    late = vz.NodeSlot("pve2", slots, wait_timeout=0.05)
    with holder, pytest.raises(TaskTimeout, match="no vzdump slot free on node pve2"):
        late.__enter__()
    assert late.handoff.is_set()
