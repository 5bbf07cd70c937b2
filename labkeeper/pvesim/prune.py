"""PVE's backup retention (``prune-backups``) as a pure function.

A port of ``PVE::Storage::prune_mark_backup_group``: backups are grouped by
guest; within a group, newest first, each ``keep-*`` option keeps the newest
backup of each of the last N periods (last/hour/day/ISO week/month/year) not
already kept by an earlier option; everything not kept is removed. Protected
backups are marked ``protected`` and never removed (nor counted). With
``keep-all=1`` or no positive option everything is kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, tzinfo
from typing import Any

KEEP_ORDER = (
    "keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly", "keep-yearly"
)


def parse_retention(text: str | None) -> dict[str, int]:
    """``keep-last=3,keep-daily=7`` -> ``{"keep-last": 3, "keep-daily": 7}``."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        key, sep, value = part.strip().partition("=")
        if sep and key:
            out[key] = int(value)
    return out


def format_retention(keep: Mapping[str, int]) -> str:
    keys = ["keep-all", *KEEP_ORDER]
    return ",".join(f"{k}={keep[k]}" for k in keys if k in keep)


def _period_funcs(tz: tzinfo | None) -> dict[str, Callable[[int], Any]]:
    def local(ctime: int) -> datetime:
        return datetime.fromtimestamp(ctime, tz)

    return {
        "keep-last": lambda c: c,
        "keep-hourly": lambda c: local(c).strftime("%Y/%m/%d/%H"),
        "keep-daily": lambda c: local(c).strftime("%Y/%m/%d"),
        "keep-weekly": lambda c: local(c).strftime("%G/%V"),
        "keep-monthly": lambda c: local(c).strftime("%Y/%m"),
        "keep-yearly": lambda c: local(c).strftime("%Y"),
    }


def mark_group(
    entries: list[dict[str, Any]], keep: Mapping[str, int], tz: tzinfo | None = None
) -> None:
    """Set ``mark`` on each entry of one guest's backups (in place).

    Entries need ``ctime``; an entry that already has ``mark`` (``protected``)
    keeps it.
    """
    positive = [k for k in KEEP_ORDER if keep.get(k, 0) > 0]
    if keep.get("keep-all") or not positive:
        for entry in entries:
            if entry.get("mark") in (None, "remove"):
                entry["mark"] = "keep"
        return
    ordered = sorted(entries, key=lambda e: e["ctime"], reverse=True)
    funcs = _period_funcs(tz)
    for option in KEEP_ORDER:
        count = keep.get(option, 0)
        if count > 0:
            _keep_periods(ordered, funcs[option], count)
    for entry in ordered:
        if entry.get("mark") is None:
            entry["mark"] = "remove"


def _keep_periods(
    ordered: list[dict[str, Any]], id_of: Callable[[int], Any], count: int
) -> None:
    """Keep the newest backup of each of the ``count`` newest periods not yet kept;
    mark the other backups of those periods for removal."""
    already = {id_of(e["ctime"]) for e in ordered if e.get("mark") == "keep"}
    newly: set[Any] = set()
    for entry in ordered:
        if entry.get("mark") is not None:
            continue
        pid = id_of(entry["ctime"])
        if pid in already:
            continue
        if pid not in newly:
            if len(newly) >= count:
                break
            newly.add(pid)
            entry["mark"] = "keep"
        else:
            entry["mark"] = "remove"


def prune_marks(
    backups: Iterable[Mapping[str, Any]],
    keep: Mapping[str, int],
    tz: tzinfo | None = None,
) -> list[dict[str, Any]]:
    """Mark a storage's backups; returns the prunebackups dry-run list.

    Each backup needs ``volid``, ``ctime``, ``vmid``, ``subtype`` (qemu/lxc) and
    may have ``protected``. Output entries: ``volid, ctime, mark, type, vmid``,
    newest first within each guest, guests in vmid order.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for backup in backups:
        entry = {
            "volid": backup["volid"],
            "ctime": int(backup["ctime"]),
            "type": backup.get("subtype") or backup.get("type") or "unknown",
            "vmid": int(backup["vmid"]),
        }
        if backup.get("protected"):
            entry["mark"] = "protected"
        groups.setdefault((entry["type"], entry["vmid"]), []).append(entry)
    out: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: (k[1], k[0])):
        group = groups[key]
        mark_group(group, keep, tz)
        out.extend(sorted(group, key=lambda e: e["ctime"], reverse=True))
    return out
