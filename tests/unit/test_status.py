"""`labkeeper status`: pure evaluation of facts against objectives."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from labkeeper import status as st
from labkeeper.inventory import parse_inventory
from labkeeper.metrics import Sample

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)

INV = parse_inventory("""
version: 1
lab: {name: home, timezone: UTC}
proxmox:
  host: pve.lan
  token_id: lk@pve!a
  token_secret: env:T
  nodes: [{name: pve1}]
  storages:
    - {name: local, type: dir, content: [backup, vztmpl]}
    - {name: local-lvm, type: lvmthin, content: [images, rootdir], snapshots: true}
guests:
  - {name: web, vmid: 100, type: lxc, node: pve1, tags: [prod],
     template: "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
     resources: {cores: 1, memory_mb: 512, disk_gb: 4, storage: local-lvm}}
  - {name: scratch, vmid: 101, type: lxc, node: pve1, tags: [test],
     template: "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
     resources: {cores: 1, memory_mb: 512, disk_gb: 4, storage: local-lvm}}
repositories:
  - {name: b2, url: /srv/restic, password: env:RP}
databases:
  - {name: app, host: db1, dbname: app, user: u, password: env:P,
     drill: {enabled: false, rpo_hours: 26}}
vzdump_jobs:
  - {name: weekly, selection: {tags: [prod]}, storage: local, schedule: "0 1 * * 6",
     retention: {keep_last: 2}}
""", "t.yaml")


@dataclass
class Snap:
    time: datetime
    tags: list[str] = field(default_factory=list)


def facts(**kw) -> st.Facts:
    return st.Facts(now=NOW, **kw)


def backup(when: datetime, series: str = "db:db1/app", bid: str = "b1") -> list[Snap]:
    """A complete database backup: its dump and its manifest (same backup: tag)."""
    return [Snap(when, ["labkeeper", series, "kind:pg_dump", f"backup:{bid}"]),
            Snap(when, ["labkeeper", series, "kind:pg_manifest", f"backup:{bid}"])]


def test_fresh_backups_are_ok_and_exit_code_is_zero():
    snaps = {"b2": backup(NOW - timedelta(hours=10))}
    rows = st.evaluate(INV, facts(snapshots=snaps, archives={100: NOW - timedelta(days=3)}))
    by = {(r.section, r.target): r for r in rows}
    assert by[("database", "app")].state == "ok"
    assert by[("guest", "web (100)")].state == "ok"
    assert ("guest", "scratch (101)") not in by
    assert st.exit_code(rows) == 0


def test_backup_older_than_the_rpo_is_late_and_fails_the_exit_code():
    snaps = {"b2": backup(NOW - timedelta(hours=30))}
    rows = st.evaluate(INV, facts(snapshots=snaps, archives={100: NOW - timedelta(days=1)}))
    assert [r.state for r in rows if r.section == "database"] == ["late"]
    assert st.exit_code(rows) == 1


def test_no_backup_at_all_is_missing_and_other_series_do_not_count():
    snaps = {"b2": backup(NOW, "db:db1/other")}
    rows = st.evaluate(INV, facts(snapshots=snaps))
    assert {r.state for r in rows if r.section in ("database", "guest")} == {"missing"}


def test_a_newer_dump_without_its_manifest_does_not_count_as_a_backup():
    # a failed attempt's leftover (dump stored, manifest never) must not hide that the
    # last complete backup is late, nor stand in for a missing one
    leftover = Snap(NOW - timedelta(hours=1), ["labkeeper", "db:db1/app", "kind:pg_dump",
                                               "backup:failed1"])
    late = st.evaluate(INV, facts(snapshots={"b2": [*backup(NOW - timedelta(hours=30)),
                                                    leftover]}))
    (row,) = [r for r in late if r.section == "database"]
    assert row.state == "late" and row.last == NOW - timedelta(hours=30)
    only = st.evaluate(INV, facts(snapshots={"b2": [leftover]}))
    assert [r.state for r in only if r.section == "database"] == ["missing"]


def test_weekly_vzdump_gets_one_period_plus_grace():
    assert st.cron_period("0 1 * * 6", "UTC", NOW) == timedelta(days=7)
    ok = st.evaluate(INV, facts(archives={100: NOW - timedelta(days=7, hours=12)}))
    late = st.evaluate(INV, facts(archives={100: NOW - timedelta(days=8)}))
    assert [r.state for r in ok if r.section == "guest"] == ["ok"]
    assert [r.state for r in late if r.section == "guest"] == ["late"]


def test_drills_updates_and_failed_runs_come_through():
    samples = [Sample("labkeeper_drill_success", {"target": "db:app"}, 0),
               Sample("labkeeper_drill_last_run_timestamp_seconds", {"target": "db:app"},
                      NOW.timestamp()),
               Sample("labkeeper_update_rolled_back", {"app": "immich"}, 1),
               Sample("labkeeper_update_success", {"app": "immich"}, 0)]
    runs = [{"name": "sassy-weasel", "flow": "pg_backup", "state": "Failed", "start": NOW}]
    rows = st.evaluate(INV, facts(metrics=samples, failed_runs=runs,
                                  errors=[("proxmox", "HTTP 401")]))
    by = {(r.section, r.target): r for r in rows}
    assert by[("drill", "db:app")].state == "failed"
    assert by[("update", "immich")].state == "warn"
    assert by[("update", "immich")].detail == "rolled back"
    assert by[("runs", "pg_backup/sassy-weasel")].state == "warn"
    assert by[("source", "proxmox")].state == "failed"


def test_series_of_an_unreadable_repository_are_not_checked_rather_than_missing():
    rows = st.evaluate(INV, facts(errors=[("repository b2", "wrong password")],
                                  archives={100: NOW}))
    by = {(r.section, r.target): r for r in rows}
    assert by[("database", "app")].state == "failed"
    assert "not checked: repository b2" in by[("database", "app")].detail
    assert by[("source", "repository b2")].state == "failed"
    assert by[("guest", "web (100)")].state == "ok"
    assert st.exit_code(rows) == 1


def test_guests_are_not_checked_when_proxmox_cannot_be_read():
    rows = st.evaluate(INV, facts(errors=[("proxmox", "HTTP 401")]))
    assert [r.state for r in rows if r.section == "guest"] == ["failed"]


def test_rows_carry_their_allowance_and_how_far_past_it_they_are():
    snaps = {"b2": backup(NOW - timedelta(hours=30))}
    (row,) = [r for r in st.evaluate(INV, facts(snapshots=snaps)) if r.section == "database"]
    assert row.allowed == timedelta(hours=26)
    assert row.overdue(NOW) == timedelta(hours=4)
    d = row.as_dict(NOW)
    assert d["allowed_hours"] == 26 and d["age_hours"] == 30


def test_drill_rows_show_the_measured_rto_and_rpo():
    labels = {"target": "db:app"}
    samples = [Sample("labkeeper_drill_success", labels, 1),
               Sample("labkeeper_drill_rto_seconds", labels, 90 * 60),
               Sample("labkeeper_drill_rpo_seconds", labels, 5 * 3600),
               Sample("labkeeper_drill_last_run_timestamp_seconds", labels, NOW.timestamp())]
    (row,) = [r for r in st.evaluate(INV, facts(metrics=samples)) if r.section == "drill"]
    assert row.state == "ok" and row.last == NOW
    assert row.detail == "RTO 1.5 h, RPO 5.0 h"


def test_path_set_with_failed_attempts_left_to_sweep_is_a_warning_naming_them():
    from labkeeper.path_backup import new_pending

    attempt = new_pending("20261121T020000Z-ab12", snapshot_host="home",
                          reason="host unreachable", now=NOW - timedelta(hours=5))
    rows = st.evaluate(INV, facts(pending={"files1/etc": [attempt]}))
    row = next(r for r in rows if r.target == "files1/etc cleanup")
    assert row.state == "warn" and row.section == "paths"
    assert "20261121T020000Z-ab12" in row.detail and "host unreachable" in row.detail
    assert row.last == NOW - timedelta(hours=5)
    assert st.exit_code([row]) == 0  # the next backup sweeps it: not a late backup


def test_gather_reads_pending_cleanups_and_an_unreadable_file_is_a_source_error(
        tmp_path, monkeypatch):
    from labkeeper.path_backup import PendingCleanups, new_pending

    monkeypatch.setenv("RP", "pw")
    inv = parse_inventory(f"""
version: 1
lab: {{name: t}}
settings: {{state_dir: {tmp_path}}}
ssh: {{user: root, key: env:K}}
hosts: [{{name: nas, address: 10.0.0.5}}, {{name: nas2, address: 10.0.0.6}}]
repositories: [{{name: r, url: {tmp_path}/no-repo, password: env:RP}}]
path_backups: [{{name: p, host: nas, paths: [/srv]}}, {{name: q, host: nas2, paths: [/srv]}}]
""", "t.yaml")
    PendingCleanups(tmp_path, "nas", "p").add(
        new_pending("20261121T020000Z-ab12", snapshot_host="t", reason="ssh timed out"))
    bad = PendingCleanups(tmp_path, "nas2", "q").path
    bad.write_text("{not json")
    got = st.gather(inv, now=NOW)
    assert [a.backup_id for a in got.pending["nas/p"]] == ["20261121T020000Z-ab12"]
    assert "nas2/q" not in got.pending
    sources = dict(got.errors)
    assert "not usable" in sources["pending cleanups of nas2/q"]
