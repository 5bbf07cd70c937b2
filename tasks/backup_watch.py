"""Tasks of the dead-man's check (flows/deadman.py): read what backups exist, tell people."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect import task

from labkeeper import notify, status
from labkeeper.inventory import Inventory

ALERT_LOG = "backup-watch"
"""``<state_dir>/backup-watch.json``: what the check already told people."""
HISTORY_DAYS = 7
"""Failed runs of this many days count in the lab's status (as `labkeeper status`)."""


@task(name="read-backups", timeout_seconds=900)
def read_backups(inv: Inventory, now: datetime,
                 runs: list[dict[str, Any]] | None = None) -> status.Facts:
    """restic snapshots of every repository that holds a series, and the newest vzdump
    archive per guest (and ``runs``, the run history's failed and late runs, as
    `labkeeper status` reads them). A source that cannot be read is a fact too (never
    an exception)."""
    return status.gather(inv, now=now, failed_runs=runs or ())


@task(name="read-run-history", timeout_seconds=300)
def read_run_history(days: int = HISTORY_DAYS) -> tuple[list[dict[str, Any]],
                                                        list[tuple[str, str]]]:
    """Failed and crashed runs of the last ``days`` days and runs the server marked
    Late, as `labkeeper status` reads them; (runs, errors): a history that cannot be
    read is an error row, never an exception."""
    from tasks.history import failed_runs, late_runs

    try:
        return failed_runs(days) + late_runs(), []
    except Exception as exc:
        return [], [("prefect", f"run history not readable: {exc}")]


@task(name="notify-late-backups", timeout_seconds=300)
def tell(inv: Inventory, rows: list[status.Row], now: datetime,
         remind_after: timedelta) -> dict[str, Any]:
    """One message per late or missing series (or unreadable source) when it becomes so,
    when its state changes and once per ``remind_after``; one when it is fine again."""
    said = status.watch_alerts(rows, now, inv.lab.name)
    book = notify.AlertLog(inv.settings.state_dir, ALERT_LOG)
    return notify.send_alerts(inv, "missing_backup", book, said.alerts, said.recoveries, now,
                              remind_after, unknown=said.unknown)
