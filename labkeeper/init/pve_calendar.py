"""Proxmox calendar events (``mon..fri 02:30``) as cron expressions, where one exists."""

from __future__ import annotations

from labkeeper.inventory import check_cron

_DAYS = {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))}
_SHORTHANDS = {"minutely": "* * * * *", "hourly": "0 * * * *", "daily": "0 0 * * *",
               "weekly": "0 0 * * 1", "monthly": "0 0 1 * *", "yearly": "0 0 1 1 *",
               "annually": "0 0 1 1 *"}


def _cal_field(text: str, lo: int, hi: int) -> str | None:
    """One PVE calendar hour/minute field (``06,18``, ``*/15``, ``2..5``) as cron."""
    out: list[str] = []
    for item in text.split(","):
        base, slash, step = item.partition("/")
        a, dots, b = base.partition("..")
        if not all(x == "*" or x.isdigit() for x in (a, b) if x):
            return None
        if any(x.isdigit() and not lo <= int(x) <= hi for x in (a, b)):
            return None
        part = a if a == "*" else str(int(a))
        if dots:
            part = f"{int(a)}-{int(b)}"
        if slash:
            if not step.isdigit():
                return None
            part = f"{part}/{int(step)}"
        out.append(part)
    return ",".join(out)


def _cal_days(text: str) -> str | None:
    out: list[str] = []
    for item in text.split(","):
        a, dots, b = item.partition("..")
        if a not in _DAYS or (dots and b not in _DAYS):
            return None
        if not dots:
            out.append(str(_DAYS[a]))
        elif _DAYS[a] <= _DAYS[b]:
            out.append(f"{_DAYS[a]}-{_DAYS[b]}")
        else:  # sat..mon wraps over sunday
            out += [f"{_DAYS[a]}-6", f"0-{_DAYS[b]}"]
    return ",".join(out)


def calendar_to_cron(event: str) -> str | None:
    """A PVE calendar event (``sat 15:00``, ``mon..fri 02:30``, ``06,18:30``, ``daily``)
    as a 5-field cron expression; None when it has no cron equivalent (dates, seconds)."""
    text = " ".join(event.strip().lower().split())
    if text in _SHORTHANDS:
        return _SHORTHANDS[text]
    parts = text.split(" ")
    days = "*"
    if parts and parts[0][:3] in _DAYS and ":" not in parts[0]:
        days = _cal_days(parts.pop(0)) or ""
    if not days or len(parts) > 1:
        return None
    hour, sep, minute = (parts[0] if parts else "0:0").partition(":")
    if not sep:  # a lone component is minutes (``*/15``)
        hour, minute = "*", hour
    h, m = _cal_field(hour, 0, 23), _cal_field(minute, 0, 59)
    if h is None or m is None:
        return None
    try:
        return check_cron(f"{m} {h} * * {days}")
    except ValueError:
        return None
