"""A server's globals (roles, tablespaces): ``pg_dumpall --globals-only`` streamed
into the repository of its first database, like a dump. A role that may not read
``pg_authid`` gets a dump without role passwords and a warning; a dump that fails
anyway is a warning too, never silence. (Whether to store them at all, when they did
not change, is :mod:`labkeeper.pg_globals`'s decision.)
"""

from __future__ import annotations

import logging

from labkeeper import postgres, process, restic
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Inventory
from labkeeper.pg_backup.cleanup import discard_attempt
from labkeeper.pg_backup.naming import backup_tag, globals_tags, new_backup_id
from labkeeper.pg_backup.results import BackupFailed, GlobalsResult
from labkeeper.pg_backup.targets import client_conn, server_label
from labkeeper.restic.repository import open_repo
from labkeeper.secrets import redact

logger = logging.getLogger(__name__)


def globals_servers(inv: Inventory, names: list[str]) -> dict[str, list[str]]:
    """Server label → the selected databases on it that ask for globals."""
    out: dict[str, list[str]] = {}
    for n in names:
        db = inv.database(n)
        if db.globals:
            out.setdefault(server_label(inv, db), []).append(n)
    return out


def _not_backed_up(label: str, why: str) -> GlobalsResult:
    detail = f"globals of {label} NOT backed up: {why}"
    logger.info("%s", detail)
    return GlobalsResult(server=label, status="warning", detail=redact(detail))


def _no_passwords(conn: postgres.Conn, warnings: list[str]) -> None:
    note = (f"role {conn.user} may not read pg_authid (not a superuser): globals "
            "dumped WITHOUT role passwords (--no-role-passwords)")
    warnings.append(note)
    logger.info("%s", note)


def backup_globals(inv: Inventory, label: str, databases: list[str], *,
                   stall_timeout: float = 300.0) -> GlobalsResult:
    """``pg_dumpall --globals-only`` of one server into the repository of its first
    database. A role that may not read ``pg_authid`` (not a superuser) gets a dump
    without role passwords and a warning; a dump that fails anyway is a warning too,
    never silence. Raises only for repository trouble (transient)."""
    db = inv.database(databases[0])
    repo_cfg = inv.repository_for(db)
    repo = open_repo(inv, repo_cfg.name)
    try:
        conn = client_conn(inv, db)
    except BackupFailed as exc:
        return _not_backed_up(label, str(exc))
    host = inv.lab.name
    filename = "globals-" + label.replace(":", "-").replace("/", "-") + ".sql"
    warnings: list[str] = []
    attempts: tuple[bool, ...] = (True, False)
    try:
        readable = postgres.query(
            conn, "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT');", timeout=60)
    except LabkeeperError as exc:
        return _not_backed_up(label, f"cannot connect to check privileges: {exc}")
    if readable and readable[0] == ["f"]:
        attempts = (False,)
        _no_passwords(conn, warnings)
    for with_passwords in attempts:
        backup_id = new_backup_id()
        producer = process.Stage(
            postgres.pg_dumpall_globals_argv(conn, role_passwords=with_passwords),
            codes=postgres.PG_DUMPALL_CODES, env=conn.env())
        try:
            stream = restic.stream_backup(
                repo, producer, filename=filename, host=host,
                tags=[*globals_tags(label), backup_tag(backup_id)],
                gate=postgres.globals_dump_complete, timeout=1800,
                compression=repo_cfg.compression, stall_timeout=stall_timeout)
        except restic.StreamFailed as exc:
            discard_attempt(repo, host=host, backup_id=backup_id,
                            unlock=not exc.eof_given or exc.cause != "producer")
            if exc.cause != "producer":
                raise BackupFailed(f"globals of {label}: {exc}", transient=exc.transient,
                                   database=f"globals {label}") from None
            if with_passwords and "permission denied" in (
                    exc.producer.stderr if exc.producer else ""):
                _no_passwords(conn, warnings)
                continue
            return _not_backed_up(label, str(exc))
        detail = "; ".join(warnings) or "roles (with passwords) and tablespaces"
        logger.info("globals of %s: snapshot %s (%d bytes): %s", label,
                    restic.short_id(stream.summary.snapshot_id), stream.bytes, detail)
        return GlobalsResult(server=label, status="warning" if warnings else "ok",
                             detail=redact(detail), snapshot_id=stream.summary.snapshot_id,
                             bytes_dumped=stream.bytes, role_passwords=with_passwords)
    raise AssertionError("unreachable")  # pragma: no cover
