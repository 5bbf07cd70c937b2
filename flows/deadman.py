"""The dead-man's check: is every backup series within its objective right now?

Runs on its own schedule (``notifications.missing_backup_schedule``), independent of the
backup jobs, so a backup that silently never ran is noticed too. It reads the restic
snapshots and vzdump archives the way `labkeeper status` does, sends one notification
(event ``missing_backup``) per late or missing series — again only when that changes,
once a day as a reminder, and once when the series is fine again — and fails the run
while anything is out of objective, so the run history shows red.

Every run also publishes the whole of `labkeeper status` (backups, drills, updates,
failed runs) as the markdown artifact ``lab-status``: the Artifacts page always shows
the latest answer to "is my lab safe?".
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from labkeeper import notify, status
from labkeeper.inventory import load_inventory
from labkeeper.secrets import redact
from tasks.backup_watch import read_backups, read_run_history, tell
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

PING = "missing_backup"
"""The key of this check in ``notifications.healthchecks.pings``."""
STATUS_KEY = "lab-status"
"""The artifact with the lab's whole status (`labkeeper status`), replaced every run."""


class BackupsLate(RunFailed):
    """At least one backup series is late or missing, or could not be checked."""


def _hooks() -> dict[str, list[Any]]:
    """The shared hooks, except that a run failed *because backups are late* only sends
    the healthchecks ``/fail`` ping: its per-series messages were sent (and deduplicated)
    by the run itself, so the generic "run failed" message would repeat them every run.
    Any other failure (a broken inventory, a crash) still notifies as ``failure``."""
    shared = hooks(PING)
    generic = shared["on_failure"][0]

    def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
        exc = failure_of(state)
        if not isinstance(exc, BackupsLate) and "BackupsLate" not in (state.message or ""):
            generic(flow, flow_run, state)
            return
        params = getattr(flow_run, "parameters", None) or {}
        try:
            inv = load_inventory(lab_path(params.get("lab")))
        except Exception:  # the run read it a moment ago; nothing to ping without it
            return
        notify.ping(inv, PING, "fail", body=redact(state.message or state.name))

    return {**shared, "on_failure": [on_failure], "on_crashed": shared["on_crashed"]}


@flow(name="backup-watch", log_prints=False, timeout_seconds=1800, **_hooks())
def backup_watch_flow(lab: str | None = None, remind_hours: float = 24.0) -> list[dict]:
    """Check every database, path set and guest backup against its objective (RPO, or
    schedule period plus grace); notify per late/missing series; fail while any is.
    Publishes the lab's whole status as the artifact ``lab-status``.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        remind_hours: Hours between reminders about a series that stays late (a series
            that becomes late, or fine again, is told at once).
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    now = datetime.now(UTC)
    runs, history_errors = read_run_history()
    facts = read_backups(inv, now, runs)
    everything = status.evaluate(inv, replace(facts, errors=[*facts.errors, *history_errors]))
    create_markdown_artifact(key=STATUS_KEY, markdown=status_markdown(inv.lab.name, everything,
                                                                      now),
                             description=status_headline(everything)[:500])
    rows = status.watched(everything)
    bad = [r for r in rows if r.state in status.BAD]
    for r in rows:
        (logger.error if r.state in status.BAD else logger.info)(
            "%-8s %-28s %-7s %s", r.section, r.target, r.state,
            status.late_summary(r, now) if r.state in status.BAD else r.detail)
    told = tell(inv, rows, now, timedelta(hours=remind_hours))
    for s in told["sent"]:
        logger.info("notified %s (%s)%s", s["key"], s["reason"],
                    "" if s["delivered"] else " — not delivered, will retry")
    if told["unchanged"]:
        logger.info("already notified, unchanged: %s", ", ".join(told["unchanged"]))
    table = [r.as_dict(now) for r in rows]
    create_table_artifact(key="backup-watch", table=table,
                          description=f"backup series of {inv.lab.name}: "
                                      f"{len(rows) - len(bad)} ok / {len(bad)} out of objective")
    create_markdown_artifact(key="backup-watch-summary", markdown=summary_markdown(
        inv.lab.name, rows, now, told))
    if not rows:
        logger.warning("backup-watch: the inventory declares no backup series")
    if bad:
        raise BackupsLate(f"{len(bad)} backup series out of objective: "
                          + "; ".join(status.late_summary(r, now) for r in bad)[:4000], table)
    logger.info("backup-watch: all %d backup series within their objectives", len(rows))
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


if __name__ == "__main__":
    backup_watch_flow()
