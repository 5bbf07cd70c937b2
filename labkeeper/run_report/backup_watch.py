"""The report of a ``backup-watch`` run: the lab's whole status as the markdown
``lab-status`` (the same rows as `labkeeper status`), the table ``backup-watch`` of
every backup series against its objective and its ``backup-watch-summary``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from labkeeper import status
from labkeeper.run_report import RunReport


class BackupWatchReport(RunReport):
    def lab_status(self, key: str, rows: list[status.Row], now: datetime) -> None:
        self.summary(status_markdown(self.inv.lab.name, rows, now),
                     status_headline(rows)[:500], key=key)

    def log_series(self, rows: list[status.Row], now: datetime) -> None:
        for r in rows:
            (self.logger.error if r.state in status.BAD else self.logger.info)(
                "%-8s %-28s %-7s %s", r.section, r.target, r.state,
                status.late_summary(r, now) if r.state in status.BAD else r.detail)

    def series(self, rows: list[status.Row], now: datetime,
               told: dict[str, Any]) -> list[dict[str, Any]]:
        """Who was told; the series' table and summary; the table."""
        for s in told["sent"]:
            self.logger.info("notified %s (%s)%s", s["key"], s["reason"],
                             "" if s["delivered"] else " — not delivered, will retry")
        if told["unchanged"]:
            self.logger.info("already notified, unchanged: %s", ", ".join(told["unchanged"]))
        bad = [r for r in rows if r.state in status.BAD]
        table = [r.as_dict(now) for r in rows]
        self.table(table, f"backup series of {self.inv.lab.name}: "
                          f"{len(rows) - len(bad)} ok / {len(bad)} out of objective")
        self.summary(summary_markdown(self.inv.lab.name, rows, now, told))
        return table


def summary_markdown(lab: str, rows: list[status.Row], now: datetime,
                     told: dict[str, Any]) -> str:
    icon = {"ok": "✅", "late": "❌", "missing": "❌", "failed": "❌"}
    lines = [f"# Backup watch of {lab}", "", f"checked {now:%Y-%m-%d %H:%M} UTC", "",
             "| | series | age | objective | detail |", "|---|---|---|---|---|"]
    for r in rows:
        age = r.age(now)
        detail = (status.late_summary(r, now) if r.state in status.BAD else r.detail)
        lines.append(f"| {icon.get(r.state, '·')} | {r.section} {r.target} | "
                     f"{status.fmt_age(age) if age is not None else '-'} | {r.objective} | "
                     f"{detail.replace('|', chr(92) + '|')} |")
    if told["sent"]:
        lines += ["", "Notified: " + ", ".join(f"{s['key']} ({s['reason']})"
                                             for s in told["sent"])]
    return "\n".join(lines)


_ICON = {"ok": "✅", "late": "❌", "missing": "❌", "failed": "❌", "warn": "⚠️", "info": "·"}


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|") or "-"


def status_headline(rows: list[status.Row]) -> str:
    bad = [r for r in rows if r.state in status.BAD]
    if not bad:
        return "all within objectives"
    return f"{len(bad)} out of objective: " + ", ".join(f"{r.section} {r.target}"
                                                       for r in bad)


def status_markdown(lab: str, rows: list[status.Row], now: datetime) -> str:
    """`labkeeper status` as a page: the answer first, then one row per series, drill,
    update and failed run."""
    bad = any(r.state in status.BAD for r in rows)
    lines = [f"# Is {lab} safe?", "",
             f"{'❌' if bad else '✅'} **{status_headline(rows)}**", "",
             f"As of {now:%Y-%m-%d %H:%M} UTC, from backup-watch (the same rows as "
             "`labkeeper status`).", "",
             "| | section | target | state | age | objective | detail |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        age = r.age(now)
        lines.append(f"| {_ICON.get(r.state, '·')} | {_cell(r.section)} | {_cell(r.target)} | "
                     f"{r.state} | {status.fmt_age(age) if age is not None else '-'} | "
                     f"{_cell(r.objective)} | {_cell(r.detail)} |")
    if not rows:
        lines.append("| · | - | - | - | - | - | the inventory declares nothing to watch |")
    return "\n".join(lines)
