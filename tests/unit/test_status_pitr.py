"""`labkeeper status` and the dead-man's check report PITR archiving (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from labkeeper import status as st
from labkeeper.inventory import parse_inventory
from labkeeper.pitr.lag import LagFacts

NOW = datetime(2026, 12, 5, 14, 10, tzinfo=UTC)
MB = 1024 * 1024
INV = parse_inventory("""\
version: 1
lab: {name: t, timezone: UTC}
repositories:
  - {name: r, url: /srv/restic, password: "env:RP"}
databases:
  - {name: appdb, host: db1, drill: {enabled: false}}
pitr:
  - name: pg1
    database: appdb
    objectives: {rpo_minutes: 15, rto_minutes: 60}
    warn: {slot_retained_mb: 100, ship_lag_minutes: 10}
""", "t.yaml")


def healthy(**kw: object) -> LagFacts:
    base = {"server": "pg1", "current_lsn": "0/9000000", "slot_exists": True,
            "slot_active": True, "retained_bytes": 3 * MB, "wal_status": "reserved",
            "spool_ready": 0, "newest_wal_in_repo": NOW - timedelta(minutes=4),
            "newest_base_in_repo": NOW - timedelta(days=2)}
    return LagFacts(**{**base, **kw})  # type: ignore[arg-type]


def pitr_rows(lag: LagFacts | None) -> dict[str, st.Row]:
    facts = st.Facts(now=NOW, snapshots={"r": []}, pitr={"pg1": lag} if lag else {})
    return {r.target: r for r in st.evaluate(INV, facts) if r.section == "pitr"}


def test_healthy_archiving_shows_receive_slot_ship_and_base_rows_all_ok() -> None:
    rows = pitr_rows(healthy())
    assert {t: r.state for t, r in rows.items()} == {
        "pg1 receive": "ok", "pg1 slot retention": "ok", "pg1 ship": "ok",
        "pg1 base backup": "ok"}
    assert "3 MiB retained" in rows["pg1 slot retention"].detail


def test_a_slot_holding_more_than_its_limit_warns_before_the_disk_fills() -> None:
    row = pitr_rows(healthy(retained_bytes=150 * MB))["pg1 slot retention"]
    assert row.state == "warn" and "150 MiB retained" in row.detail


def test_an_inactive_slot_warns_and_a_missing_one_fails() -> None:
    assert pitr_rows(healthy(slot_active=False))["pg1 receive"].state == "warn"
    gone = pitr_rows(healthy(slot_exists=False, slot_active=False, retained_bytes=None))
    assert gone["pg1 receive"].state == "failed" and "does not exist" in gone["pg1 receive"].detail


def test_segments_waiting_in_the_spool_warn_before_the_rpo_is_lost() -> None:
    row = pitr_rows(healthy(spool_ready=4, oldest_ready_age_s=11 * 60))["pg1 ship"]
    assert row.state == "warn" and "not keeping up" in row.detail


def test_wal_in_the_repository_older_than_the_rpo_is_late() -> None:
    row = pitr_rows(healthy(newest_wal_in_repo=NOW - timedelta(minutes=20)))["pg1 ship"]
    assert row.state == "late" and st.exit_code([row]) == 1


def test_a_pitr_server_not_read_is_not_checked_rather_than_ok() -> None:
    assert pitr_rows(None)["pg1 ship"].state == "failed"


def test_the_dead_mans_check_tells_pitr_warnings_and_late_wal() -> None:
    lag = healthy(retained_bytes=150 * MB, newest_wal_in_repo=NOW - timedelta(minutes=20))
    rows = st.evaluate(INV, st.Facts(now=NOW, snapshots={"r": []}, pitr={"pg1": lag}))
    said = st.watch_alerts(rows, NOW, "t")
    states = {a.key: a.state for a in said.alerts}
    assert states["pitr:pg1 slot retention"] == "warn"
    assert states["pitr:pg1 ship"] == "late"
    assert "pitr:pg1 receive" in said.recoveries
