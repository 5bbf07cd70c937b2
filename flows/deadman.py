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

from labkeeper import notify, status
from labkeeper.inventory import load_inventory
from labkeeper.run_report.backup_watch import BackupWatchReport
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
    report = BackupWatchReport(inv, "backup-watch", logger)
    report.lab_status(STATUS_KEY, everything, now)
    rows = status.watched(everything)
    bad = [r for r in rows if r.state in status.BAD]
    report.log_series(rows, now)
    told = tell(inv, rows, now, timedelta(hours=remind_hours))
    table = report.series(rows, now, told)
    if not rows:
        logger.warning("backup-watch: the inventory declares no backup series")
    if bad:
        raise BackupsLate(f"{len(bad)} backup series out of objective: "
                          + "; ".join(status.late_summary(r, now) for r in bad)[:4000], table)
    logger.info("backup-watch: all %d backup series within their objectives", len(rows))
    return table


if __name__ == "__main__":
    backup_watch_flow()
