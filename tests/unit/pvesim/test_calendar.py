"""PVE calendar events for backup job schedules (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from labkeeper.pvesim.calendar import CalendarError, parse_calendar_event

NOW = datetime(2024, 6, 26, 12, 0, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize(("spec", "expected"), [
    ("sun 01:00", datetime(2024, 6, 30, 1, 0, tzinfo=UTC)),
    ("*-*-* 02:30", datetime(2024, 6, 27, 2, 30, tzinfo=UTC)),
    ("daily", datetime(2024, 6, 27, 0, 0, tzinfo=UTC)),
    ("06,18:30", datetime(2024, 6, 26, 18, 30, tzinfo=UTC)),
    ("sat 15:00", datetime(2024, 6, 29, 15, 0, tzinfo=UTC)),
    ("mon..fri 21:00", datetime(2024, 6, 26, 21, 0, tzinfo=UTC)),
    ("*/15", datetime(2024, 6, 26, 12, 15, tzinfo=UTC)),
    ("monthly", datetime(2024, 7, 1, 0, 0, tzinfo=UTC)),
    ("hourly", datetime(2024, 6, 26, 13, 0, tzinfo=UTC)),
])
def test_valid_schedule_has_expected_next_run(spec: str, expected: datetime) -> None:
    assert parse_calendar_event(spec).next_after(NOW, UTC) == expected


@pytest.mark.parametrize("spec", ["", "whenever", "25:00", "sun 01:99", "funday 10:00",
                                  "*-13-01 00:00", "1 2 3 4"])
def test_garbage_schedule_is_rejected_with_pve_wording(spec: str) -> None:
    with pytest.raises(CalendarError, match="unable to parse calendar event"):
        parse_calendar_event(spec)
