"""The nightly file backup: each path set backed up by restic on the host that holds it.

Per run: the selected path sets (default: all; ``host=`` limits to one host) in turn
(``tasks.path_backup.backup_path_set``: restic checked on the host, locks handled,
``restic backup --json`` over SSH with the secrets on stdin, progress in the log,
the snapshot proven by its attempt tag). Earlier failed attempts whose cleanup could
not finish (host unreachable) are swept first, and what was done is in the set's notes
(see ``labkeeper.path_backup.sweep_pending``). A set whose files were partly unreadable
(restic exit 3), or whose pending cleanup is still incomplete, is a *warning* with the
reason in the artifact; one failed set does
not stop the others; the run fails at the end if any failed. Leaves a table artifact
``path-backup`` and a markdown ``path-backup-summary``, emits
``labkeeper.backup.succeeded`` / ``labkeeper.backup.failed`` per set, records the
backup metrics; the flow hooks ping healthchecks for ``path_backup``.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from labkeeper import path_backup
from labkeeper.inventory import load_inventory
from labkeeper.run_report.backups import PathBackupReport
from tasks import path_backup as path_tasks
from tasks.common import RunFailed, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "path-backup"


class PathBackupRunFailed(RunFailed):
    """At least one path set failed."""


@flow(name="path_backup", log_prints=False, timeout_seconds=26 * 3600,
      **hooks("path_backup"))
def path_backup_flow(lab: str | None = None, host: str | None = None,
                     names: list[str] | None = None) -> list[dict]:
    """Back up the lab's path sets (default: all; ``host``: only that host's).

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        host: Only the path sets on this host (its name in the inventory).
        names: Only these path sets (their names in path_backups); empty: all.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    chosen = path_backup.select_path_sets(inv, host, names)
    logger.info("path_backup: %d path set(s) of lab %s: %s", len(chosen), inv.lab.name,
                ", ".join(f"{inv.path_backup(n).host}/{n}" for n in chosen))
    report = PathBackupReport(inv, ARTIFACT_KEY, logger)
    for name in chosen:
        report.path_set_done(name, path_tasks.backup_path_set(inv, name, return_state=True))
    report.finish(len(chosen))
    if report.failed:
        raise PathBackupRunFailed(f"{len(report.failed)} of {len(chosen)} path set backups "
                                  f"failed: {', '.join(report.failed)}", report.rows)
    return report.rows


if __name__ == "__main__":
    path_backup_flow()
