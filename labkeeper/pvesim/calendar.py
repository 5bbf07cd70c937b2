"""PVE calendar events (systemd-like ``sun 01:00``, ``*-*-* 02:30``, ``daily``) — pure.

Grammar (as in the PVE admin guide, "Schedule Format"):
``[WEEKDAY] [[YEARS-]MONTHS-DAYS] [HOURS:MINUTES[:SECONDS]]``, each component a
``*``, a value, a list ``a,b``, a range ``a..b`` or a repetition ``a/step``,
``*/step``; weekdays ``mon..fri``; plus the special words ``minutely``,
``hourly``, ``daily``, ``weekly``, ``monthly``, ``yearly``/``annually``,
``quarterly``, ``semiannually``. A lone time component without ``:`` is
minutes (``*/15``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, tzinfo

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

SPECIAL = {
    "minutely": "*-*-* *:*:00",
    "hourly": "*-*-* *:00:00",
    "daily": "*-*-* 00:00:00",
    "weekly": "mon *-*-* 00:00:00",
    "monthly": "*-*-01 00:00:00",
    "yearly": "*-01-01 00:00:00",
    "annually": "*-01-01 00:00:00",
    "quarterly": "*-01,04,07,10-01 00:00:00",
    "semiannually": "*-01,07-01 00:00:00",
}


class CalendarError(ValueError):
    pass


@dataclass(frozen=True)
class CalendarEvent:
    weekdays: frozenset[int] | None
    years: frozenset[int] | None
    months: frozenset[int] | None
    days: frozenset[int] | None
    hours: frozenset[int]
    minutes: frozenset[int]

    def next_after(self, after: datetime, tz: tzinfo | None = None) -> datetime | None:
        """First event strictly after ``after`` (minute resolution), within 5 years."""
        start = after.astimezone(tz).replace(second=0, microsecond=0) + timedelta(minutes=1)
        day = start.replace(hour=0, minute=0)
        for _ in range(366 * 5):
            if self._day_matches(day):
                for hour in sorted(self.hours):
                    for minute in sorted(self.minutes):
                        candidate = day.replace(hour=hour, minute=minute)
                        if candidate >= start:
                            return candidate
            day = (day + timedelta(days=1)).replace(hour=0, minute=0)
        return None

    def _day_matches(self, day: datetime) -> bool:
        if self.weekdays is not None and day.weekday() not in self.weekdays:
            return False
        if self.years is not None and day.year not in self.years:
            return False
        if self.months is not None and day.month not in self.months:
            return False
        return self.days is None or day.day in self.days


def _error(text: str) -> CalendarError:
    return CalendarError(f"unable to parse calendar event '{text}'")


def _component(text: str, low: int, high: int, original: str) -> frozenset[int] | None:
    """Parse one numeric component; None means "any"."""
    if text == "*":
        return None
    values: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"(\*|\d+)(?:\.\.(\d+))?(?:/(\d+))?", item)
        if not match:
            raise _error(original)
        start_s, end_s, step_s = match.groups()
        start = low if start_s == "*" else int(start_s)
        end = int(end_s) if end_s else (high if step_s or start_s == "*" else start)
        step = int(step_s) if step_s else 1
        if step == 0 or not (low <= start <= high) or not (low <= end <= high) or end < start:
            raise _error(original)
        values.update(range(start, end + 1, step))
    return frozenset(values)


def _weekdays(text: str, original: str) -> frozenset[int]:
    days: set[int] = set()
    for item in text.split(","):
        first, sep, last = item.partition("..")
        if first[:3] not in WEEKDAYS or (sep and last[:3] not in WEEKDAYS):
            raise _error(original)
        a = WEEKDAYS.index(first[:3])
        b = WEEKDAYS.index(last[:3]) if sep else a
        if b < a:
            days.update(range(a, 7))
            days.update(range(0, b + 1))
        else:
            days.update(range(a, b + 1))
    return frozenset(days)


def parse_calendar_event(text: str) -> CalendarEvent:
    """Parse a calendar event or raise CalendarError with PVE's wording."""
    original = text
    spec = text.strip().lower()
    if not spec:
        raise _error(original)
    spec = SPECIAL.get(spec, spec)
    tokens = spec.split()
    weekdays = years = months = days = None
    hours: frozenset[int] | None = frozenset({0})
    minutes: frozenset[int] | None = frozenset({0})
    if tokens and re.fullmatch(r"[a-z.,]+", tokens[0]):
        weekdays = _weekdays(tokens.pop(0), original)
    if tokens and "-" in tokens[0]:
        parts = tokens.pop(0).split("-")
        if len(parts) == 2:
            parts = ["*", *parts]
        if len(parts) != 3:
            raise _error(original)
        years = _component(parts[0], 1970, 9999, original)
        months = _component(parts[1], 1, 12, original)
        days = _component(parts[2], 1, 31, original)
    if tokens:
        time_spec = tokens.pop(0)
        if ":" in time_spec:
            tparts = time_spec.split(":")
            if len(tparts) not in (2, 3):
                raise _error(original)
            hours = _component(tparts[0], 0, 23, original)
            minutes = _component(tparts[1], 0, 59, original)
            if len(tparts) == 3:
                _component(tparts[2], 0, 59, original)
        else:
            hours = None
            minutes = _component(time_spec, 0, 59, original)
    if tokens:
        raise _error(original)
    return CalendarEvent(
        weekdays=weekdays,
        years=years,
        months=months,
        days=days,
        hours=hours if hours is not None else frozenset(range(24)),
        minutes=minutes if minutes is not None else frozenset(range(60)),
    )
