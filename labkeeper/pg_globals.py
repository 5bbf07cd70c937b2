"""Globals (roles, tablespaces) stored only when they changed.

Roles change rarely; storing the same few kilobytes every night cost a restic start
(≈0.85 s, key derivation and index load) on every run. Instead each run dumps the
globals into memory (``pg_dumpall --globals-only``, tens of milliseconds), hashes the
dump without PostgreSQL's per-dump random ``\\restrict``/``\\unrestrict`` lines, and
compares it with the record of the last stored dump of that server
(``<settings.state_dir>/pg_backup/globals-<server>.json``: sha256, the snapshot that
holds it, its repository, when). Unchanged, same repository, same password mode and
stored less than :data:`REUSE_DAYS` ago: nothing is stored, and the run's row says the
globals are unchanged and which snapshot holds them (a ``kind:pg_globals`` series
keeps its newest snapshot under any ``keep-*`` retention; the periodic re-store
bounds what a snapshot removed by hand could cost). Otherwise they are stored as
before (:func:`labkeeper.pg_backup.backup_globals`) and the record is written only
when a second in-memory dump right after the store still has the same hash (so the
record names a snapshot that really holds that content). :func:`check_globals` is the
first half alone (no restic): the flow runs it beside the first database's backup.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from labkeeper import pg_backup, postgres, process, restic
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Inventory

logger = logging.getLogger(__name__)

REUSE_DAYS = 7.0
"""Unchanged globals are stored again after this many days anyway."""


def normalised_hash(dump: str) -> str:
    """sha256 of a globals dump without the lines that differ on every dump."""
    kept = [ln for ln in dump.splitlines()
            if not ln.startswith(("\\restrict", "\\unrestrict"))]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()


def record_path(inv: Inventory, label: str) -> Path:
    safe = label.replace(":", "-").replace("/", "-")
    return inv.settings.state_dir / pg_backup.PENDING_DIR / f"globals-{safe}.json"


def read_record(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reusable(record: dict[str, object] | None, *, sha256: str, repository: str,
             repo_url: str, role_passwords: bool, now: datetime) -> str | None:
    """The snapshot id holding these very globals, or None (store them)."""
    if not record or record.get("sha256") != sha256 or not record.get("snapshot_id"):
        return None
    if (record.get("repository"), record.get("repo_url")) != (repository, repo_url):
        return None
    if record.get("role_passwords") != role_passwords:
        return None
    try:
        stored = datetime.fromisoformat(str(record["stored_at"]))
    except (KeyError, ValueError):
        return None
    if now - stored > timedelta(days=REUSE_DAYS) or stored > now:
        return None
    return str(record["snapshot_id"])


def write_record(path: Path, record: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _dump_hash(conn: postgres.Conn, role_passwords: bool) -> str | None:
    """The globals' hash, or None when they cannot be dumped here (the store path then
    says why)."""
    try:
        res = process.run(postgres.pg_dumpall_globals_argv(conn, role_passwords=role_passwords),
                          codes=postgres.PG_DUMPALL_CODES, env=conn.env(), timeout=120)
    except LabkeeperError:
        return None
    if res.truncated or postgres.globals_dump_complete(res.stdout[-4096:].encode(),
                                                       len(res.stdout)):
        return None
    return normalised_hash(res.stdout)


def _may_read_passwords(conn: postgres.Conn) -> bool | None:
    try:
        rows = postgres.query(
            conn, "SELECT has_table_privilege('pg_catalog.pg_authid', 'SELECT');", timeout=60)
    except LabkeeperError:
        return None
    return not (rows and rows[0] == ["f"])


def _unchanged(label: str, held_by: str, digest: str, record: dict[str, object],
               with_passwords: bool, conn: postgres.Conn) -> pg_backup.GlobalsResult:
    detail = (f"unchanged since {record.get('stored_at', '?')} (sha256 {digest[:12]}): "
              f"held by snapshot {restic.short_id(held_by)}; not stored again")
    if not with_passwords:
        detail = (f"role {conn.user} may not read pg_authid (not a superuser): globals "
                  f"WITHOUT role passwords (--no-role-passwords); {detail}")
    logger.info("globals of %s: %s", label, detail)
    return pg_backup.GlobalsResult(server=label, status="ok" if with_passwords else "warning",
                                   detail=detail, snapshot_id=held_by,
                                   role_passwords=with_passwords)


def check_globals(inv: Inventory, label: str, databases: list[str], *,
                  now: datetime | None = None) -> pg_backup.GlobalsResult | None:
    """The row of one server's globals when they are proven unchanged since their last
    stored dump (nothing to store, no restic started); None when they must be stored
    (changed, never stored, stored long ago, or not dumpable here: storing says why).
    Cheap (two ``psql`` queries and an in-memory ``pg_dumpall``), so the flow runs it
    alongside the first database's backup."""
    return _check(inv, label, databases, now or datetime.now(UTC))[0]


def _check(inv: Inventory, label: str, databases: list[str], now: datetime
           ) -> tuple[pg_backup.GlobalsResult | None, postgres.Conn | None, str | None]:
    """(the unchanged row or None, the connection, the dump's hash)."""
    db = inv.database(databases[0])
    repo_cfg = inv.repository_for(db)
    path = record_path(inv, label)
    try:
        conn = pg_backup.client_conn(inv, db)
    except LabkeeperError:
        return None, None, None
    with_passwords = _may_read_passwords(conn)
    if with_passwords is None:
        return None, conn, None
    digest = _dump_hash(conn, with_passwords)
    if digest is None:
        return None, conn, None
    record = read_record(path)
    held_by = reusable(record, sha256=digest, repository=repo_cfg.name,
                       repo_url=repo_cfg.url, role_passwords=with_passwords, now=now)
    if held_by is None:
        return None, conn, digest
    return _unchanged(label, held_by, digest, record or {}, with_passwords, conn), conn, digest


def backup_globals_if_changed(inv: Inventory, label: str, databases: list[str], *,
                              stall_timeout: float = 300.0,
                              now: datetime | None = None) -> pg_backup.GlobalsResult:
    """Globals of one server: proven unchanged (nothing stored) or stored."""
    now = now or datetime.now(UTC)
    unchanged, conn, digest = _check(inv, label, databases, now)
    if unchanged is not None:
        return unchanged
    result = pg_backup.backup_globals(inv, label, databases, stall_timeout=stall_timeout)
    if result.snapshot_id and digest is not None and conn is not None \
            and _dump_hash(conn, result.role_passwords) == digest:
        repo_cfg = inv.repository_for(inv.database(databases[0]))
        write_record(record_path(inv, label),
                     {"sha256": digest, "snapshot_id": result.snapshot_id,
                      "repository": repo_cfg.name, "repo_url": repo_cfg.url,
                      "role_passwords": result.role_passwords,
                      "stored_at": now.isoformat(timespec="seconds")})
    return result
