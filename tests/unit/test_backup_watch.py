"""The dead-man's check without I/O: which alerts are due, what the log keeps, what the
messages say."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from labkeeper import notify, status
from labkeeper.notify import Alert, after_alerts, plan_alerts

NOW = datetime(2026, 11, 21, 9, 0, tzinfo=UTC)
LATE = Alert("database:appdb", "late", "t", "b")


def _log(state: str, hours_ago: float) -> dict[str, dict[str, str]]:
    return {"database:appdb": {"state": state,
                               "notified": (NOW - timedelta(hours=hours_ago)).isoformat()}}


def test_a_new_late_series_is_due():
    plan = plan_alerts({}, [LATE], NOW)
    assert plan.send == [(LATE, "new")] and plan.recovered == []


def test_the_same_late_series_is_not_repeated_within_a_day():
    assert plan_alerts(_log("late", 23), [LATE], NOW).send == []


def test_a_series_still_late_after_a_day_gets_a_reminder():
    assert plan_alerts(_log("late", 24), [LATE], NOW).send == [(LATE, "reminder")]


def test_a_change_of_state_is_told_at_once():
    assert plan_alerts(_log("missing", 1), [LATE], NOW).send == [(LATE, "changed")]


def test_a_series_no_longer_late_has_recovered():
    plan = plan_alerts(_log("late", 1), [], NOW)
    assert plan.send == [] and plan.recovered == ["database:appdb"]


def test_an_undelivered_alert_is_not_logged_so_the_next_run_tries_again():
    assert after_alerts({}, [LATE], delivered=[], recovered_told=[], now=NOW) == {}
    logged = after_alerts({}, [LATE], delivered=["database:appdb"], recovered_told=[], now=NOW)
    assert logged == {"database:appdb": {"state": "late", "notified": NOW.isoformat()}}


def test_an_undelivered_reminder_keeps_the_old_stamp_and_a_told_recovery_is_forgotten():
    old = _log("late", 30)
    assert after_alerts(old, [LATE], delivered=[], recovered_told=[], now=NOW) == old
    assert after_alerts(old, [], delivered=[], recovered_told=["database:appdb"], now=NOW) == {}
    assert after_alerts(old, [], delivered=[], recovered_told=[], now=NOW) == old


def test_alert_log_round_trips_and_tolerates_a_damaged_file(tmp_path: Path):
    book = notify.AlertLog(tmp_path, "backup-watch")
    assert book.read() == {}
    book.write(_log("late", 2))
    assert book.read() == _log("late", 2)
    book.path.write_text("{not json")
    assert book.read() == {}


def test_late_summary_says_what_is_late_and_by_how_much():
    row = status.Row("database", "appdb", "late", NOW - timedelta(hours=30), "RPO 26.0 h",
                     "db:pg/appdb in b2", timedelta(hours=26))
    text = status.late_summary(row, NOW)
    assert text == ("database appdb: last good backup 30.0 h ago (2026-11-20 03:00 UTC), "
                    "4.0 h past its objective (RPO 26.0 h)")


def test_watch_alerts_one_per_late_series_recovery_for_ok_and_unknown_for_unchecked():
    rows = [status.Row("database", "a", "late", NOW - timedelta(hours=30), "RPO 26.0 h", "",
                       timedelta(hours=26)),
            status.Row("paths", "nas/photos", "missing", None, "every 24.0 h", "no backup"),
            status.Row("guest", "web (100)", "ok", NOW - timedelta(days=1), "weekly", ""),
            status.Row("database", "b", "failed", None, "RPO 26.0 h",
                       "not checked: repository b2 not readable"),
            status.Row("source", "repository b2", "failed", None, "readable", "HTTP 403"),
            status.Row("drill", "db:a", "failed", None, "passes", ""),
            status.Row("runs", "pg_backup/x", "warn", None, "last 7 days", "Failed")]
    said = status.watch_alerts(rows, NOW, "home")
    assert [(a.key, a.state) for a in said.alerts] == [
        ("database:a", "late"), ("paths:nas/photos", "missing"),
        ("source:repository b2", "failed")]
    assert "path set nas/photos: no backup found" in said.alerts[1].body
    assert list(said.recoveries) == ["guest:web (100)"]
    assert said.unknown == {"database:b"}
