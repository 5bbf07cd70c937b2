"""Tasks of the dead-man's check (flows/deadman.py): read what backups exist, tell people."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from prefect import task

from labkeeper import notify, status
from labkeeper.inventory import Inventory

ALERT_LOG = "backup-watch"
"""``<state_dir>/backup-watch.json``: what the check already told people."""


@task(name="read-backups", timeout_seconds=900)
def read_backups(inv: Inventory, now: datetime) -> status.Facts:
    """restic snapshots of every repository that holds a series, and the newest vzdump
    archive per guest. A source that cannot be read is a fact too (never an exception)."""
    return status.gather(inv, now=now)


@task(name="notify-late-backups", timeout_seconds=300)
def tell(inv: Inventory, rows: list[status.Row], now: datetime,
         remind_after: timedelta) -> dict[str, Any]:
    """One message per late or missing series (or unreadable source) when it becomes so,
    when its state changes and once per ``remind_after``; one when it is fine again."""
    said = status.watch_alerts(rows, now, inv.lab.name)
    book = notify.AlertLog(inv.settings.state_dir, ALERT_LOG)
    return notify.send_alerts(inv, "missing_backup", book, said.alerts, said.recoveries, now,
                              remind_after, unknown=said.unknown)
