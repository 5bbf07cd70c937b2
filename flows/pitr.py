"""Point-in-time recovery jobs: the weekly base backup, the 5-minute WAL ship, the drill.

Read as the runbook: for each PITR server, take a base backup (pg_basebackup into
restic, proven complete) and then apply retention (older base backups and only the
WAL no kept one needs); every few minutes ship the completed WAL segments from the
spool (verified in the repository before they leave the spool) and report lag; on
the drill schedule restore for real to a random moment and to the newest, and judge
RTO/RPO. The receiver itself is a service (``labkeeper wal receive``), not a flow.

The runbook ``pitr-restore-database`` puts one database back on the live server as of a
moment through the small flows at the end (each a ``flow`` step): copy it out of a
scratch recovery, compare it with the live one, swap it in after approval, swap back
or drop the copy when something goes wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from labkeeper.inventory import Inventory, load_inventory
from labkeeper.inventory.pitr import pitr_server, pitr_servers
from labkeeper.secrets import redact
from tasks import pitr as pitr_tasks
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks


class PitrRunFailed(RunFailed):
    """At least one server's step failed."""


def select_servers(inv: Inventory, servers: list[str] | None) -> list[str]:
    names = list(servers) if servers else [s.name for s in pitr_servers(inv)]
    for n in names:
        pitr_server(inv, n)  # unknown names fail now
    return names


def _failed(server: str, state: Any) -> dict[str, Any]:
    exc = failure_of(state)
    return {"server": server, "status": "failed",
            "notes": redact(f"{type(exc).__name__}: {exc}" if exc else str(state.name))}


def _per_server(inv: Inventory, servers: list[str] | None, run: Callable[[str], Any],
                rows_of: Callable[[str, Any], list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Run one step per server (task run states); the rows of its result, or a failed
    row."""
    rows: list[dict[str, Any]] = []
    for name in select_servers(inv, servers):
        state = run(name)
        rows += rows_of(name, state.result()) if state.is_completed() else \
            [_failed(name, state)]
    return rows


def _finish(key: str, rows: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    create_table_artifact(key=key, table=rows, description=what)
    bad = [r["server"] for r in rows if r.get("status") == "failed"]
    if bad:
        raise PitrRunFailed(f"{what}: failed for {', '.join(bad)}", rows)
    return rows


@flow(name="pitr_base_backup", timeout_seconds=12 * 3600, **hooks("pitr_base_backup"))
def pitr_base_backup_flow(lab: str | None = None, servers: list[str] | None = None
                          ) -> list[dict[str, Any]]:
    """Take a base backup of each PITR server, then apply its retention.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB, else
            lab.yaml).
        servers: Only these PITR servers (their names in the inventory); empty: every one.
    """
    inv = load_inventory(lab_path(lab))

    def backed_up(name: str, res: Any) -> list[dict[str, Any]]:
        kept = pitr_tasks.apply_retention(inv, name, return_state=True)
        return [res.row()] + ([] if kept.is_completed() else [_failed(f"{name} retention",
                                                                     kept)])

    rows = _per_server(inv, servers, lambda name: pitr_tasks.base_backup(
        inv, name, return_state=True), backed_up)
    return _finish("pitr-base-backup", rows, "PITR base backups")


@flow(name="pitr_wal_ship", timeout_seconds=3600, **hooks("pitr_wal_ship"))
def pitr_wal_ship_flow(lab: str | None = None, servers: list[str] | None = None
                       ) -> list[dict[str, Any]]:
    """Ship each server's completed WAL segments into the repository; report lag.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB, else
            lab.yaml).
        servers: Only these PITR servers (their names in the inventory); empty: every one.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    rows: list[dict[str, Any]] = []
    for name in select_servers(inv, servers):
        state = pitr_tasks.ship_wal(inv, name, return_state=True)
        row = state.result().row() if state.is_completed() else _failed(name, state)
        lag = pitr_tasks.lag_report(inv, name, return_state=True)
        if lag.is_completed():
            row["warnings"] = "; ".join(lag.result()["warnings"])
        else:
            logger.warning("%s: lag report failed: %s", name, failure_of(lag))
        rows.append(row)
    return _finish("pitr-wal-ship", rows, "PITR WAL shipping")


@flow(name="pitr_drill", timeout_seconds=12 * 3600, **hooks("pitr_drill"))
def pitr_drill_flow(lab: str | None = None, servers: list[str] | None = None,
                    seed: int | None = None) -> list[dict[str, Any]]:
    """Restore each PITR server for real to a random moment and to the newest.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB, else
            lab.yaml).
        servers: Only these PITR servers (their names in the inventory); empty: every one.
        seed: Seed for the random restore moment, to repeat a drill; empty: a new one.
    """
    inv = load_inventory(lab_path(lab))

    def drilled(name: str, res: Any) -> list[dict[str, Any]]:
        rows = [{"server": name, **r.row()} for r in res.rows]
        if res.breaches:
            rows.append({"server": name, "status": "failed", "notes": "; ".join(res.breaches)})
        return rows

    rows = _per_server(inv, servers, lambda name: pitr_tasks.pitr_drill(
        inv, name, seed, return_state=True), drilled)
    return _finish("pitr-drill", rows, "PITR drill")


# -- one database back on the live server (the steps of runbook pitr-restore-database) --

def _step(state: Any) -> dict[str, Any]:
    if not state.is_completed():
        raise PitrRunFailed(redact(str(failure_of(state) or state.name)), [])
    result: dict[str, Any] = state.result()
    return result


@flow(name="pitr_restore_copy", timeout_seconds=12 * 3600, **hooks("pitr_restore_copy"))
def pitr_restore_copy_flow(server: str, database: str, to: str, lab: str | None = None
                           ) -> dict[str, Any]:
    """Recover SERVER to TO in a scratch cluster on this host and copy DATABASE onto the
    live server as a new database <db>_pitr_<stamp>; the live database is not touched
    and the scratch cluster is removed.

    Args:
        server: The PITR server (its name in the inventory's pitr section).
        database: The database to bring back (its name in the inventory).
        to: The moment: an ISO time (2026-12-05T14:04:00Z), an LSN, or latest.
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB, else
            lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    return _step(pitr_tasks.live_copy(inv, server, database, to, return_state=True))


@flow(name="pitr_compare_copy", timeout_seconds=3600, **hooks("pitr_compare_copy"))
def pitr_compare_copy_flow(database: str, copy_db: str, lab: str | None = None
                           ) -> dict[str, Any]:
    """Row counts of the point-in-time copy against the live database now.

    Args:
        database: The database (its name in the inventory).
        copy_db: The copy pitr_restore_copy made (<db>_pitr_<stamp>).
        lab: Inventory file (empty: $LABKEEPER_LAB, else lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    return _step(pitr_tasks.compare_copy(inv, database, copy_db, return_state=True))


@flow(name="pitr_swap_copy", timeout_seconds=3600, **hooks("pitr_swap_copy"))
def pitr_swap_copy_flow(database: str, copy_db: str, lab: str | None = None) -> dict[str, Any]:
    """Put the copy in place of the database; the original is kept as
    <db>_before_pitr_<stamp>.

    Args:
        database: The database (its name in the inventory).
        copy_db: The copy pitr_restore_copy made (<db>_pitr_<stamp>).
        lab: Inventory file (empty: $LABKEEPER_LAB, else lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    return _step(pitr_tasks.swap_copy(inv, database, copy_db, return_state=True))


@flow(name="pitr_swap_back", timeout_seconds=3600, **hooks("pitr_swap_back"))
def pitr_swap_back_flow(database: str, copy_db: str, lab: str | None = None) -> dict[str, Any]:
    """Undo pitr_swap_copy: the original under its name again, the copy under its own.

    Args:
        database: The database (its name in the inventory).
        copy_db: The copy pitr_restore_copy made (<db>_pitr_<stamp>).
        lab: Inventory file (empty: $LABKEEPER_LAB, else lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    return _step(pitr_tasks.swap_back(inv, database, copy_db, return_state=True))


@flow(name="pitr_drop_copy", timeout_seconds=3600, **hooks("pitr_drop_copy"))
def pitr_drop_copy_flow(database: str, copy_db: str, lab: str | None = None) -> dict[str, Any]:
    """Drop a point-in-time copy that was not swapped in.

    Args:
        database: The database (its name in the inventory).
        copy_db: The copy pitr_restore_copy made (<db>_pitr_<stamp>).
        lab: Inventory file (empty: $LABKEEPER_LAB, else lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    return _step(pitr_tasks.drop_copy(inv, database, copy_db, return_state=True))
