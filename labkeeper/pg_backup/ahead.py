"""The dump's restic started ahead of its backup (:func:`start_ahead`): a run's first
databases get their ``restic backup --stdin`` before the run's own bookkeeping (the
Prefect run, the flow's set-up), so restic's start-up (key derivation, lock, index:
≈0.7 s here) overlaps it instead of following it. :func:`labkeeper.pg_backup.
backup_database` takes its database's restic over (:func:`take`).

Nothing changes in what a backup does or proves: the restic taken over is the one the
backup would have started, with the same arguments and backup id (else it is stopped
and the backup starts its own). A restic nobody takes is stopped with SIGINT (it stores
nothing; the lock it may leave is removed: :func:`labkeeper.restic.start_backup_early`);
:func:`started_ahead` stops what its run did not take, and each expires on its own after
:data:`AHEAD_EXPIRES`.

Only where it cannot change the outcome: no start for a database with earlier failed
attempts awaiting cleanup (that sweep must not meet our own lock), and none for a
repository whose secrets come from Prefect blocks (no Prefect call before the run).
``LABKEEPER_NO_AHEAD=1`` switches it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from labkeeper import restic
from labkeeper.inventory import Inventory
from labkeeper.pg_backup.cleanup import pending_store
from labkeeper.pg_backup.naming import backup_tag, dump_filename, new_backup_id, series_tags
from labkeeper.restic.repository import open_repo

logger = logging.getLogger(__name__)

AHEAD_EXPIRES = 120.0
"""Seconds a restic started ahead waits to be taken before it stops on its own."""

NO_AHEAD = "LABKEEPER_NO_AHEAD"
"""Set (not empty, not 0): nothing is started ahead; each backup starts its restic when
it runs, as before (an operator's way back, and the A/B of benchmarks/runner_bench.py)."""

_BLOCK_PREFIX = "prefect-block:"


def disabled(environ: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get(NO_AHEAD, "")
    return value.strip() not in ("", "0")


@dataclass(frozen=True)
class Ahead:
    """One database's restic started ahead, and the backup id it carries."""

    lab: str
    database: str
    backup_id: str
    early: restic.EarlyBackup


_started: dict[tuple[str, str], Ahead] = {}
_lock = threading.Lock()


def start_ahead(inv: Inventory, names: Sequence[str]) -> list[Ahead]:
    """Start the dump's restic of each of ``names`` (a run's first databases) now.
    Best effort: a database where that could change anything, or whose start fails,
    is skipped (its backup then starts restic itself, as always)."""
    out: list[Ahead] = []
    if disabled():
        return out
    for name in names:
        try:
            ahead = _start_one(inv, name)
        except Exception as exc:  # the backup itself reports any real problem
            logger.debug("%s: restic not started ahead: %s", name, exc)
            continue
        if ahead is not None:
            out.append(ahead)
    return out


def _start_one(inv: Inventory, name: str) -> Ahead | None:
    db = inv.database(name)
    repo_cfg = inv.repository_for(db)
    s3 = repo_cfg.s3
    refs = [repo_cfg.password, *((s3.access_key_id, s3.secret_access_key) if s3 else ())]
    if any(str(r).startswith(_BLOCK_PREFIX) for r in refs):
        return None
    if pending_store(inv, name).read():
        return None
    key = (inv.lab.name, name)
    with _lock:
        if key in _started:
            return None
    backup_id = new_backup_id()
    server = inv.database_server(db)
    early = restic.start_backup_early(
        open_repo(inv, repo_cfg.name), filename=dump_filename(db.name, db.format),
        host=inv.lab.name, tags=[*series_tags(server, name), backup_tag(backup_id)],
        compression=repo_cfg.compression, expires=AHEAD_EXPIRES)
    ahead = Ahead(lab=inv.lab.name, database=name, backup_id=backup_id, early=early)
    with _lock:
        _started[key] = ahead
    logger.debug("%s: the dump's restic started ahead (backup %s)", name, backup_id)
    return ahead


def take(inv: Inventory, name: str) -> Ahead | None:
    """The restic started ahead for this database, once (None if there is none or it
    is no longer waiting)."""
    with _lock:
        ahead = _started.pop((inv.lab.name, name), None)
    if ahead is None or not ahead.early.waiting:
        return None
    return ahead


def stop(started: Sequence[Ahead], why: str) -> None:
    """Stop each of ``started`` that no backup took."""
    for ahead in started:
        with _lock:
            if _started.get((ahead.lab, ahead.database)) is ahead:
                del _started[(ahead.lab, ahead.database)]
        ahead.early.stop(why=why)


@contextlib.contextmanager
def started_ahead(inv: Inventory, names: Sequence[str]) -> Iterator[list[Ahead]]:
    """:func:`start_ahead` for the block's run; what it did not take is stopped after."""
    started = start_ahead(inv, names)
    try:
        yield started
    finally:
        stop(started, "its run did not use it")
