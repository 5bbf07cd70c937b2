"""The pure parts of application updates: names, retention, windows, apt, plans, journal."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from flows.update import select_apps
from labkeeper import proxmox as px
from labkeeper import update as core
from labkeeper.errors import ConfigError, is_transient
from labkeeper.inventory import App, AppApt, MaintenanceWindow, parse_inventory


def test_run_ids_sort_by_time_and_differ_within_one_second():
    at = datetime(2026, 3, 7, 4, 5, 6, tzinfo=UTC)
    assert core.new_run_id(at, token="0a1b2c3d") == "20260307-040506-0a1b2c3d"
    ids = {core.new_run_id(at) for _ in range(200)}
    assert len(ids) == 200 and all(i.startswith("20260307-040506-") for i in ids)


def test_snapshot_names_carry_app_and_run_and_fit_proxmox():
    rid = core.new_run_id(datetime(2026, 3, 7, 4, 5, 6, tzinfo=UTC), token="0a1b2c3d")
    name = core.snapshot_name("immich", rid)
    assert name == "labkeeper-pre-update-immich-0a1b2c3d" and len(name) <= 40
    long = core.snapshot_name("a-very-long-application-name", rid)
    assert len(long) <= 40 and long.endswith("-0a1b2c3d") and core.is_pre_update(long)
    assert core.is_pre_update(name) and not core.is_pre_update("weekly")


def test_two_apps_on_one_guest_in_the_same_second_get_different_snapshots():
    at = datetime(2026, 3, 7, 4, 5, 6, tzinfo=UTC)
    a = core.snapshot_name("web", core.new_run_id(at))
    b = core.snapshot_name("web", core.new_run_id(at))
    c = core.snapshot_name("api", core.new_run_id(at))
    assert len({a, b, c}) == 3


def snap(name: str, t: int) -> px.Snapshot:
    return px.Snapshot(name=name, snaptime=t)


def test_stale_snapshots_keep_the_newest_ours_and_never_touch_others():
    snaps = [snap("labkeeper-pre-update-a", 1), snap("manual", 0),
             snap("labkeeper-pre-update-c", 3), snap("labkeeper-pre-update-b", 2)]
    assert core.stale_snapshots(snaps, 1) == ["labkeeper-pre-update-a",
                                              "labkeeper-pre-update-b"]
    assert core.stale_snapshots(snaps, 0) == ["labkeeper-pre-update-a",
                                              "labkeeper-pre-update-b",
                                              "labkeeper-pre-update-c"]
    assert core.stale_snapshots(snaps, 5) == []
    assert core.stale_snapshots(snaps, 0, spare=["labkeeper-pre-update-b"]) == \
        ["labkeeper-pre-update-a", "labkeeper-pre-update-c"]


def test_stale_archives_are_the_pre_update_ones_by_notes():
    vols = [px.StorageVolume(volid=f"local:backup/v{i}", content="backup", ctime=i,
                             notes=n) for i, n in
            enumerate(["labkeeper-pre-update-1 app=web", "nightly", "labkeeper-pre-update-2 "
                       "app=web"])]
    assert core.stale_archives(vols, 1) == ["local:backup/v0"]


@pytest.mark.parametrize(("when", "inside"), [
    ("2026-03-07T03:30", True),   # sat, inside
    ("2026-03-07T06:00", False),  # sat, end is exclusive
    ("2026-03-09T03:30", False),  # mon
])
def test_window_on_given_days(when, inside):
    w = MaintenanceWindow(days=["sat", "sun"], start="03:00", end="06:00", timezone="UTC")
    assert core.in_window(w, datetime.fromisoformat(when).replace(tzinfo=UTC), "UTC") is inside


@pytest.mark.parametrize(("when", "inside"), [
    ("2026-03-06T23:30", True),   # fri night
    ("2026-03-07T02:00", True),   # sat early morning: the window opened on friday
    ("2026-03-07T05:00", False),
    ("2026-03-08T02:00", False),  # sun early: opened on saturday, which is not listed
])
def test_window_crossing_midnight_counts_the_day_it_opened(when, inside):
    w = MaintenanceWindow(days=["fri"], start="23:00", end="05:00", timezone="UTC")
    assert core.in_window(w, datetime.fromisoformat(when).replace(tzinfo=UTC), "UTC") is inside


def test_window_uses_its_time_zone_else_the_labs():
    w = MaintenanceWindow(start="03:00", end="04:00")
    at = datetime(2026, 7, 1, 1, 30, tzinfo=UTC)  # 03:30 in Berlin (CEST)
    assert core.in_window(w, at, "Europe/Berlin")
    assert not core.in_window(w, at, "UTC")
    assert core.in_window(None, at, "UTC")


def test_apt_full_upgrade_is_noninteractive_and_keeps_config_files():
    steps = core.apt_steps(AppApt())
    assert steps[0] == ("apt-get", "-q", "update")
    assert steps[1] == ("apt-get", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
                        "-o", "Dpkg::Options::=--force-confold", "full-upgrade")
    assert len(steps) == 2 and core.APT_ENV["DEBIAN_FRONTEND"] == "noninteractive"


def test_apt_named_packages_only_upgrade_and_autoremove():
    cfg = AppApt(packages=["nginx", "openssl"], autoremove=True)
    steps = core.apt_steps(cfg)
    assert steps[1][-4:] == ("install", "--only-upgrade", "nginx", "openssl")
    assert steps[2] == ("apt-get", "-y", "-q", "autoremove")
    assert core.apt_simulate_argv(cfg) == ("apt-get", "-s", "-q", "install",
                                           "--only-upgrade", "nginx", "openssl")
    assert core.apt_simulate_argv(AppApt()) == ("apt-get", "-s", "-q", "full-upgrade")


APT_SIM = """Reading package lists...
Building dependency tree...
The following packages have been kept back:
  linux-image-amd64
The following packages will be upgraded:
  libc6 openssl
Inst libc6 [2.36-9+deb12u3] (2.36-9+deb12u4 Debian:12.5/stable [amd64])
Inst openssl [3.0.11-1~deb12u2] (3.0.13-1~deb12u1 Debian-Security:12/stable-security [amd64])
Inst libnew1 (1.0-1 Debian:12.5/stable [amd64])
Conf libc6 (2.36-9+deb12u4 Debian:12.5/stable [amd64])
"""


def test_apt_simulation_lists_what_will_change_but_not_held_packages():
    changes = core.parse_apt_simulation(APT_SIM)
    assert changes == {"libc6": ("2.36-9+deb12u3", "2.36-9+deb12u4"),
                       "openssl": ("3.0.11-1~deb12u2", "3.0.13-1~deb12u1"),
                       "libnew1": ("", "1.0-1")}
    assert "linux-image-amd64" not in changes


def test_dpkg_query_argv_and_parse():
    assert core.dpkg_query_argv(["a", "b"]) == ("dpkg-query", "-W",
                                                "-f=${Package}\t${Version}\n", "a", "b")
    assert core.parse_dpkg_query("libc6:amd64\t2.36\nopenssl\t3.0.13\n\n") == \
        {"libc6": "2.36", "openssl": "3.0.13"}


def test_update_steps_per_strategy():
    cmds = App(name="a", guest="g", strategy="commands",
               commands={"update": [["git", "pull"], ["systemctl", "restart", "a"]]})
    assert core.update_steps(cmds) == [("git", "pull"), ("systemctl", "restart", "a")]
    comp = App(name="c", guest="g", compose={"dir": "/opt/c"})
    assert core.update_steps(comp)[-1][-2:] == ("-d", "--remove-orphans")
    apt = App(name="p", guest="g", strategy="apt")
    assert core.update_steps(apt)[-1][-1] == "full-upgrade"


def test_journal_round_trips_through_json(tmp_path: Path):
    prot = core.Protection("snapshot", "pve1", 300, "lxc", snapshot="labkeeper-pre-update-x")
    j = core.Journal("web", "x", "updated", prot, {"version": "1"}, {"version": "2"}, 5.0)
    back = core.Journal.from_json(j.to_json())
    assert back == j and back.protection.text() == "snapshot labkeeper-pre-update-x"


def test_journal_of_an_earlier_version_without_new_fields_still_reads():
    text = ('{"app": "web", "run_id": "20250101-000000", "phase": "updated", "before": {},'
            ' "protection": {"kind": "compose-images", "node": "n", "vmid": 1, "gtype": "lxc",'
            ' "images": {"web": "sha256:aa"}}, "attempted": {}, "started": 5.0, "detail": ""}')
    j = core.Journal.from_json(text)
    assert j.touched == 0.0 and j.offered == {} and j.protection.refs == {}
    assert j.protection.images == {"web": "sha256:aa"}


def _gate_app(deadline: float = 60, initial_delay: float = 5) -> App:
    return App(name="web", guest="g", strategy="commands",
               commands={"update": [["true"]]},
               gate={"initial_delay": initial_delay, "deadline": deadline, "interval": 1})


def test_a_journal_older_than_the_gate_and_the_margin_is_stale():
    app = _gate_app()
    prot = core.Protection("snapshot", "pve1", 300, "lxc", snapshot="s")
    j = core.Journal("web", "r", "updated", prot, touched=1000.0)
    limit = 5 + 60 + core.STALE_MARGIN
    assert not core.is_stale(j, app, now=1000.0 + limit - 1)
    assert core.is_stale(j, app, now=1000.0 + limit + 1)
    unknown = core.Journal("web", "r", "updated", prot)  # no time at all: never trusted
    assert core.is_stale(unknown, app, now=1000.0)


def test_writing_a_journal_stamps_it_so_a_fresh_one_is_not_stale(tmp_path: Path):
    inv = parse_inventory(LAB.replace("lab: {name: t}",
                                      f"lab: {{name: t}}\nsettings: {{state_dir: {tmp_path}}}"))
    prot = core.Protection("snapshot", "pve1", 300, "lxc", snapshot="s")
    core.write_journal(inv, core.Journal("a", "r", "updated", prot))
    (j,) = core.open_journals(inv)
    assert not core.is_stale(j, inv.app("a"))


def test_cleanup_spares_what_other_apps_open_journals_name(tmp_path: Path):
    inv = parse_inventory(LAB.replace("lab: {name: t}",
                                      f"lab: {{name: t}}\nsettings: {{state_dir: {tmp_path}}}"))
    mine = core.Protection("snapshot", "pve1", 300, "lxc", snapshot="labkeeper-pre-update-a-1")
    other = core.Protection("vzdump", "pve1", 300, "lxc", volid="local:backup/x.tar.zst")
    core.write_journal(inv, core.Journal("a", "1", "updated", mine))
    core.write_journal(inv, core.Journal("b", "2", "protected", other))
    assert core.spared_names(inv, but="a") == {"local:backup/x.tar.zst"}
    assert core.spared_names(inv) == {"labkeeper-pre-update-a-1", "local:backup/x.tar.zst"}
    snaps = [snap("labkeeper-pre-update-a-1", 1), snap("labkeeper-pre-update-b-2", 2),
             snap("labkeeper-pre-update-a-3", 3)]
    spare = core.spared_names(inv, but="c")
    assert core.stale_snapshots(snaps, 0, spare=sorted(spare)) == \
        ["labkeeper-pre-update-b-2", "labkeeper-pre-update-a-3"]


def test_the_guest_lock_is_exclusive_and_says_who_holds_it(tmp_path: Path):
    inv = parse_inventory(LAB.replace("lab: {name: t}",
                                      f"lab: {{name: t}}\nsettings: {{state_dir: {tmp_path}}}"))
    with core.guest_lock(inv, "g", holder="update of a", timeout=0):
        with pytest.raises(core.GuestBusy, match="update of a, pid") as info:
            with core.guest_lock(inv, "g", holder="update of b", timeout=0):
                pass
        assert is_transient(info.value)
        with core.guest_lock(inv, "other-guest", holder="update of c", timeout=0):
            pass  # another guest: its own lock
    with core.guest_lock(inv, "g", holder="update of b", timeout=0):
        pass  # released on exit


def test_a_pin_remembers_bad_digests_and_keeps_them_across_rollbacks(tmp_path: Path):
    inv = parse_inventory(LAB.replace("lab: {name: t}",
                                      f"lab: {{name: t}}\nsettings: {{state_dir: {tmp_path}}}"))
    prot = core.Protection("compose-images", "pve1", 300, "lxc",
                           images={"web": "sha256:good"}, refs={"web": "r/app:latest"},
                           digests={"web": "sha256:d-good"})
    j = core.Journal("a", "1", "updated", prot, offered={"web": "sha256:d-bad1"})
    core.pin_after_rollback(inv, j, "gate")
    j2 = core.Journal("a", "2", "updated", prot, offered={"web": "sha256:d-bad2"})
    pin = core.pin_after_rollback(inv, j2, "gate")
    assert pin is not None and core.read_pin(inv, "a") == pin
    assert pin.bad_digests() == {"sha256:d-bad1", "sha256:d-bad2"}
    assert "pinned to web=sha256:d-good" in pin.text()
    assert [p.app for p in core.pins(inv)] == ["a"]
    assert core.clear_pin(inv, "a") and core.read_pin(inv, "a") is None


def test_update_errors_are_permanent_so_prefect_does_not_retry_them():
    for exc in (core.UpdateFailed("x"), core.GateFailed("x"), core.RollbackFailed("x")):
        assert not is_transient(exc)


def test_fmt_versions_shows_a_single_version_plainly():
    assert core.fmt_versions({"version": "1.2"}) == "1.2"
    assert core.fmt_versions({"web": "a", "db": "b"}) == "db=b, web=a"
    assert core.fmt_versions({}) == "-"


LAB = """
version: 1
lab: {name: t}
guests:
  - {name: g, vmid: 300, type: lxc, node: pve1, template: "local:vztmpl/d.tar.zst",
     resources: {cores: 1, memory_mb: 256, disk_gb: 2, storage: local-lvm},
     ssh: {address: 127.0.0.1, key: "env:K"}}
proxmox:
  host: 127.0.0.1
  token_id: a@pve!b
  token_secret: env:X
  nodes: [{name: pve1}]
  storages:
    - {name: local, type: dir, content: [backup, vztmpl]}
    - {name: local-lvm, type: lvmthin, content: [rootdir, images]}
apps:
  - {name: a, guest: g, strategy: commands, commands: {update: [["true"]]}, tags: [web]}
  - {name: b, guest: g, strategy: commands, commands: {update: [["true"]]}}
  - {name: c, guest: g, strategy: commands, commands: {update: [["true"]]}, tags: [web]}
"""


def test_select_apps_by_name_in_order_by_tag_or_all():
    inv = parse_inventory(LAB)
    assert [a.name for a in select_apps(inv, ["c", "a"], None)] == ["c", "a"]
    assert [a.name for a in select_apps(inv, "b", None)] == ["b"]
    assert [a.name for a in select_apps(inv, None, "web")] == ["a", "c"]
    assert [a.name for a in select_apps(inv, None, None)] == ["a", "b", "c"]
    with pytest.raises(ConfigError):
        select_apps(inv, ["nope"], None)
    with pytest.raises(ConfigError):
        select_apps(inv, None, "no-such-tag")


def test_final_state_rolled_back_is_a_failed_state_named_rolledback():
    from flows.update import UpdateRunFailed, _final_state

    rolled = _final_state([core.AppResult("web", "rolled-back", "gate"),
                           core.AppResult("db", "updated")])
    assert rolled.is_failed() and rolled.name == "RolledBack" and "web" in rolled.message
    assert isinstance(rolled.data, UpdateRunFailed) and len(rolled.data.rows) == 2
    failed = _final_state([core.AppResult("web", "rolled-back"),
                           core.AppResult("db", "failed", "rollback failed")])
    assert failed.is_failed() and failed.name == "Failed" and "db" in failed.message
    skipped = _final_state([core.AppResult("web", "skipped", "outside the window")])
    assert skipped.is_completed() and skipped.name == "Skipped"


@pytest.mark.parametrize("status", ["blocked", "held", "stale"])
def test_an_app_not_updated_for_a_reason_is_never_a_green_run(status):
    from flows.update import _final_state

    state = _final_state([core.AppResult("web", status, "why"),
                          core.AppResult("db", "updated")])
    assert state.is_failed() and state.name == "NotUpdated" and "web: " + status in \
        state.message
    ok = _final_state([core.AppResult("web", "updated"), core.AppResult("x", "skipped")])
    assert isinstance(ok, list) and [r["status"] for r in ok] == ["updated", "skipped"]


def test_summary_shows_versions_before_attempted_after():
    from flows.update import summary

    text = summary([core.AppResult("web", "rolled-back", "gate failed", "snapshot s",
                                   {"version": "1.0"}, {"version": "2.0"}, {"version": "1.0"},
                                   plan=["sh -c upgrade"])])
    assert "| ↩️ | web | rolled-back | snapshot s | 1.0 | 2.0 | 1.0 | gate failed |" in text
    assert "sh -c upgrade" in text
