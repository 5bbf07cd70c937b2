"""PVE's keep-last/hourly/daily/weekly/monthly/yearly retention (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from labkeeper.pvesim.prune import format_retention, parse_retention, prune_marks

T0 = datetime(2024, 6, 30, 23, 0, tzinfo=UTC)  # a Sunday


def backups(*times: datetime, vmid: int = 101, protected: frozenset[int] = frozenset()) -> list:
    return [{"volid": f"local:backup/b{i}", "ctime": int(t.timestamp()), "vmid": vmid,
             "subtype": "lxc", "protected": i in protected} for i, t in enumerate(times)]


def marks(entries: list, keep: str) -> dict[str, str]:
    return {e["volid"]: e["mark"] for e in prune_marks(entries, parse_retention(keep), UTC)}


def test_parse_and_format_retention_round_trip() -> None:
    keep = parse_retention("keep-daily=7,keep-last=3")
    assert keep == {"keep-daily": 7, "keep-last": 3}
    assert format_retention(keep) == "keep-last=3,keep-daily=7"


def test_keep_all_keeps_everything() -> None:
    entries = backups(T0, T0 - timedelta(days=1))
    assert set(marks(entries, "keep-all=1").values()) == {"keep"}


def test_no_positive_option_keeps_everything() -> None:
    assert set(marks(backups(T0, T0 - timedelta(days=1)), "keep-last=0").values()) == {"keep"}


def test_keep_last_keeps_newest_n() -> None:
    entries = backups(*(T0 - timedelta(hours=h) for h in range(5)))
    assert marks(entries, "keep-last=2") == {"local:backup/b0": "keep", "local:backup/b1": "keep",
                                             "local:backup/b2": "remove",
                                             "local:backup/b3": "remove",
                                             "local:backup/b4": "remove"}


def test_keep_daily_keeps_newest_backup_of_each_day() -> None:
    day = T0.replace(hour=12)
    entries = backups(day.replace(hour=20), day.replace(hour=8), day - timedelta(days=1),
                      day - timedelta(days=2))
    assert marks(entries, "keep-daily=2") == {
        "local:backup/b0": "keep", "local:backup/b1": "remove", "local:backup/b2": "keep",
        "local:backup/b3": "remove"}


def test_keep_last_then_daily_skips_days_already_covered() -> None:
    # like PVE: keep-last keeps b0,b1 (same day); daily then starts from the next day
    day = T0.replace(hour=12)
    entries = backups(day.replace(hour=20), day.replace(hour=8), day - timedelta(days=1),
                      day - timedelta(days=2), day - timedelta(days=3))
    result = marks(entries, "keep-last=2,keep-daily=2")
    assert result == {"local:backup/b0": "keep", "local:backup/b1": "keep",
                      "local:backup/b2": "keep", "local:backup/b3": "keep",
                      "local:backup/b4": "remove"}


def test_keep_weekly_uses_iso_weeks() -> None:
    # 2024-06-30 is Sunday of ISO week 26; 2024-07-01 is Monday of week 27
    sunday = datetime(2024, 6, 30, 10, tzinfo=UTC)
    monday = datetime(2024, 7, 1, 10, tzinfo=UTC)
    saturday = datetime(2024, 6, 29, 10, tzinfo=UTC)
    entries = backups(monday, sunday, saturday)
    assert marks(entries, "keep-weekly=2") == {
        "local:backup/b0": "keep", "local:backup/b1": "keep", "local:backup/b2": "remove"}


def test_keep_monthly_and_yearly() -> None:
    entries = backups(datetime(2024, 6, 5, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC),
                      datetime(2024, 5, 20, tzinfo=UTC), datetime(2023, 12, 31, tzinfo=UTC),
                      datetime(2022, 12, 31, tzinfo=UTC))
    assert marks(entries, "keep-monthly=2,keep-yearly=2") == {
        "local:backup/b0": "keep", "local:backup/b1": "remove", "local:backup/b2": "keep",
        "local:backup/b3": "keep", "local:backup/b4": "keep"}


def test_keep_hourly_keeps_newest_per_hour() -> None:
    base = T0.replace(minute=0)
    entries = backups(base + timedelta(minutes=50), base + timedelta(minutes=10),
                      base - timedelta(minutes=30))
    assert marks(entries, "keep-hourly=5") == {
        "local:backup/b0": "keep", "local:backup/b1": "remove", "local:backup/b2": "keep"}


def test_protected_backup_is_never_removed_nor_counted() -> None:
    entries = backups(*(T0 - timedelta(hours=h) for h in range(3)), protected=frozenset({0}))
    assert marks(entries, "keep-last=1") == {
        "local:backup/b0": "protected", "local:backup/b1": "keep", "local:backup/b2": "remove"}


def test_guests_are_pruned_separately() -> None:
    entries = [*backups(T0, T0 - timedelta(hours=1), vmid=101),
               {"volid": "local:backup/other", "ctime": int(T0.timestamp()) - 10, "vmid": 102,
                "subtype": "qemu"}]
    result = prune_marks(entries, {"keep-last": 1}, UTC)
    by_volid = {e["volid"]: e for e in result}
    assert by_volid["local:backup/other"]["mark"] == "keep"
    assert by_volid["local:backup/other"]["type"] == "qemu"
    assert by_volid["local:backup/b1"]["mark"] == "remove"
