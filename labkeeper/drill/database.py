"""Database drill: restore the latest dump into a scratch database, prove it, drop it.

1. The newest dump of the database's series that has its manifest; RPO = age of the
   manifest's snapshot, against ``drill.rpo_hours``.
2. A scratch database ``labkeeper_drill_<name>_<random>`` on the drill server: a
   prefix no real database uses and ``CREATE DATABASE`` refuses an existing name, so
   a drill can never hit a real database.
3. Streamed restore (:mod:`labkeeper.drill.pgrestore`); bytes streamed must equal
   the manifest's.
4. Verify: every manifest table with exactly its row count and no extra table, no
   unexpected restore error, the smoke queries, the server's globals dump complete.
5. RTO = CREATE DATABASE → verified, against ``drill.rto_minutes``.
6. The scratch database is always dropped, unless the drill failed and
   ``keep_on_failure`` is set: then the result says where it is.
"""

from __future__ import annotations

import logging
import os
import re
import secrets as pysecrets
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from labkeeper import pg_backup, pg_container, pg_drop, postgres, process, restic
from labkeeper import progress as progress_mod
from labkeeper.drill.pgrestore import compare_tables, judge_smoke, restored_counts, stream_restore
from labkeeper.drill.result import DrillResult, dur, objective_checks
from labkeeper.errors import CommandError, ConfigError, LabkeeperError
from labkeeper.inventory import DRILL_DB_PREFIX, Database, DrillServer, Inventory
from labkeeper.secrets import resolve

logger = logging.getLogger(__name__)

# =====================================================================================
# naming (pure)
# =====================================================================================

_PG_IDENT_MAX = 63


def scratch_db_name(name: str, *, token: str | None = None) -> str:
    """``labkeeper_drill_<name>_<random>``: a lowercase plain identifier of at most 63
    bytes. The prefix is reserved for drills; the random part avoids two drills (or
    a kept failure) ever sharing a name."""
    token = token or pysecrets.token_hex(4)
    if not re.fullmatch(r"[0-9a-f]{4,16}", token):
        raise ValueError("token must be 4-16 lowercase hex digits")
    clean = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_") or "db"
    room = _PG_IDENT_MAX - len(DRILL_DB_PREFIX) - len(token) - 1
    return f"{DRILL_DB_PREFIX}{clean[:room].rstrip('_')}_{token}"


def is_scratch_db(name: str) -> bool:
    return name.startswith(DRILL_DB_PREFIX) and re.fullmatch(r"[a-z0-9_]{1,63}", name) is not None


def create_db_sql(name: str) -> str:
    if not is_scratch_db(name):
        raise ValueError(f"refusing to create {name!r}: not a {DRILL_DB_PREFIX}* name")
    return f"CREATE DATABASE {postgres.quote_ident(name)} TEMPLATE template0;"


def drop_db_sql(name: str) -> str:
    """The only DROP DATABASE labkeeper issues: for drill scratch databases only."""
    if not is_scratch_db(name):
        raise ValueError(f"refusing to drop {name!r}: not a {DRILL_DB_PREFIX}* name")
    return f"DROP DATABASE IF EXISTS {postgres.quote_ident(name)} WITH (FORCE);"


# =====================================================================================
# the drill
# =====================================================================================


def drill_conn(inv: Inventory, server: DrillServer, dbname: str | None = None
               ) -> postgres.Conn:
    """Connection to a drill server (``local``: libpq's PGHOST/PGPORT or the socket;
    ``container``: its tools run in the container)."""
    if server.container is not None:
        return pg_container.drill_container_conn(inv, server, dbname=dbname,
                                                 timeout=24 * 3600)
    if server.host is not None:
        host = server.host
    elif server.guest is not None:
        address = inv.guest(server.guest).address
        if address is None:
            raise ConfigError(f"drill server {server.name}: guest {server.guest} has no address")
        host = address
    else:
        host = os.environ.get("PGHOST", "/var/run/postgresql")
    port = server.port
    if server.host is None and server.guest is None and os.environ.get("PGPORT"):
        port = int(os.environ["PGPORT"])
    return postgres.Conn(host=host, port=port, dbname=dbname or server.maintenance_db,
                         user=server.user,
                         password=resolve(server.password) if server.password else None,
                         sslmode=server.sslmode)


def database_drill(inv: Inventory, name: str, *,
                   now: Callable[[], datetime] | None = None,
                   keep_on_failure: bool | None = None) -> DrillResult:
    """Restore the latest backup of database ``name`` into a scratch database and
    prove it (see the module docstring). ``keep_on_failure`` overrides the inventory."""
    clock = now or (lambda: datetime.now(tz=UTC))
    started = time.monotonic()
    db = inv.database(name)
    spec = db.drill
    keep = spec.keep_on_failure if keep_on_failure is None else keep_on_failure
    result = DrillResult("database", name, rpo_objective_s=spec.rpo_hours * 3600,
                         rto_objective_s=spec.rto_minutes * 60)
    try:
        _database_drill(inv, db, result, keep=keep, clock=clock)
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    result.duration_s = time.monotonic() - started
    logger.info("database drill %s: %s — %s", name, result.status.upper(), result.summary())
    return result


def _database_drill(inv: Inventory, db: Database, result: DrillResult, *, keep: bool,
                    clock: Callable[[], datetime]) -> None:
    name = db.name
    repo_cfg = inv.repository_for(db)
    repo = pg_backup.open_repo(inv, repo_cfg.name)
    found = _latest_backup(inv, db, repo, repo_cfg.name, result, clock=clock)
    if found is None:
        return
    backup, manifest = found
    assert manifest.dump is not None  # _latest_backup fails the drill otherwise
    drill_server = inv.drill_server(db.drill.server)
    # The drill server's own client (or the matching installed one), and a server at
    # least as new as the dump's.
    admin = pg_container.check_restore_target(
        manifest.server_version, pg_container.matching(drill_conn(inv, drill_server)),
        f"drill server {drill_server.name}")
    scratch = scratch_db_name(name)
    scratch_conn = replace(drill_conn(inv, drill_server, dbname=scratch), client=admin.client)
    where = f"{scratch} on drill server {drill_server.name} ({admin.host}:{admin.port})"
    restore_started = time.monotonic()
    created = False
    try:
        postgres.query(admin, create_db_sql(scratch), timeout=120)
        created = True
        result.scratch = scratch
        logger.info("%s: restoring %s:%s into %s", name, result.source, manifest.dump.path,
                    where)
        _restore(inv, db, repo, backup, manifest, scratch_conn, result)
        _verify(inv, db, repo, manifest, scratch_conn, result)
        result.rto_s = time.monotonic() - restore_started
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    finally:
        if created:
            _drop_or_keep(admin, scratch, where, name, result, keep=keep)
    objective_checks(result)


def _latest_backup(inv: Inventory, db: Database, repo: restic.Repo, repo_name: str,
                   result: DrillResult, *, clock: Callable[[], datetime]
                   ) -> tuple[pg_backup.StoredBackup, pg_backup.Manifest] | None:
    """The newest complete backup and its manifest (RPO measured), or None (failed)."""
    name = db.name
    server = inv.database_server(db)
    backup = pg_backup.find_latest_backup(repo, lab=inv.lab.name, server=server, name=name)
    if backup is None:
        result.fail(f"no complete backup (dump + manifest) of db:{server}/{name} in "
                    f"repository {repo_name}")
        return None
    manifest = pg_backup.read_manifest(repo, backup)
    if manifest.dump is None:
        result.fail(f"manifest of backup {backup.backup_id} does not describe its dump")
        return None
    result.source = backup.dump.short_id or backup.dump.id[:8]
    result.rpo_s = max(0.0, (clock() - manifest.created_at).total_seconds())
    logger.info("%s: latest backup %s (snapshot %s, %s bytes, %s tables), RPO %s "
                "(objective %s)", name, backup.backup_id, result.source, manifest.dump.bytes,
                manifest.table_count, dur(result.rpo_s), dur(result.rpo_objective_s))
    result.check("backup", True, f"backup {backup.backup_id} from "
                                 f"{manifest.created_at.isoformat(timespec='seconds')}")
    # The manifest names its dump by id: full since ids were made canonical, restic
    # 0.14's short one in manifests written before; same_id accepts both.
    result.check("manifest names dump", restic.same_id(manifest.dump.snapshot_id, backup.dump.id),
                 f"manifest's dump snapshot {restic.short_id(manifest.dump.snapshot_id)}, "
                 f"dump snapshot {restic.short_id(backup.dump.id)}")
    return backup, manifest


def _restore(inv: Inventory, db: Database, repo: restic.Repo, backup: pg_backup.StoredBackup,
             manifest: pg_backup.Manifest, conn: postgres.Conn, result: DrillResult
             ) -> None:
    """Stream the dump into the scratch database; check its size and restore errors."""
    dump = manifest.dump
    assert dump is not None
    with progress_mod.Progress(f"{db.name}: restore", total=dump.bytes,
                               interval=inv.settings.progress_interval) as progress:
        outcome = stream_restore(repo, backup.dump.id, dump.path, conn,
                                 fmt=manifest.dump_format, timeout=db.timeout_minutes * 60,
                                 on_bytes=progress.add)
    result.check("dump size", outcome.bytes == dump.bytes,
                 f"{outcome.bytes} bytes streamed, manifest says {dump.bytes}")
    if outcome.expected_errors:
        result.notes.append(f"{len(outcome.expected_errors)} expected restore error(s) "
                            "(roles missing on the drill server), e.g. "
                            + outcome.expected_errors[0])
    result.check("restore errors", not outcome.unexpected_errors,
                 (f"{len(outcome.unexpected_errors)} unexpected: "
                  + " | ".join(outcome.unexpected_errors[:3]))
                 if outcome.unexpected_errors else
                 f"{outcome.bytes} bytes restored in {outcome.duration:.1f} s, no "
                 "unexpected error")


def _verify(inv: Inventory, db: Database, repo: restic.Repo, manifest: pg_backup.Manifest,
            conn: postgres.Conn, result: DrillResult) -> None:
    """Row counts against the manifest, the smoke queries, the globals dump."""
    counts = restored_counts(conn)
    for c in compare_tables(manifest.tables, counts):
        result.checks.append(c)
    for i, sq in enumerate(db.drill.smoke_queries):
        label = f"smoke {sq.name or i + 1}"
        try:
            ok, detail = judge_smoke(sq, postgres.query(conn, sq.sql, timeout=300))
        except CommandError as exc:
            ok, detail = False, f"query failed: {exc.stderr_tail or exc}"
        result.check(label, ok, f"{sq.sql!r} {detail}")
    _check_globals(inv, db, repo, result)


def _check_globals(inv: Inventory, db: Database, repo: restic.Repo, result: DrillResult
                   ) -> None:
    if not db.globals:
        result.notes.append("globals not taken for this server (globals: false)")
        return
    label = pg_backup.server_label(inv, db)
    snaps = restic.find_snapshots(repo, tags=pg_backup.globals_tags(label), host=inv.lab.name)
    if not snaps:
        result.check("globals", False, f"no globals dump of server {label} in the repository")
        return
    newest = snaps[-1]
    path = newest.paths[0] if newest.paths else ""
    text = restic.dump_file(repo, newest.id, path, timeout=300)
    data = text.encode()
    why = postgres.globals_dump_complete(data[-process.GATE_TAIL_BYTES:], len(data))
    if why:
        result.check("globals", False, f"globals dump {newest.short_id} {path}: {why}")
        return
    roles = sum(1 for line in text.splitlines() if line.startswith("CREATE ROLE "))
    result.check("globals", True, f"{path} in {newest.short_id} complete ({roles} role(s), "
                                  f"{newest.time.isoformat(timespec='seconds')})")
    logger.info("globals of %s: %s complete", label, newest.short_id)


def _drop_or_keep(admin: postgres.Conn, scratch: str, where: str, name: str,
                  result: DrillResult, *, keep: bool) -> None:
    """Drop the scratch database, or keep it when the drill failed and keep is set."""
    if keep and not result.passed:
        result.kept = where
        result.notes.append(f"scratch database kept for inspection: {where}; drop it "
                            f"with: {drop_db_sql(scratch)}")
        logger.info("%s: drill failed; kept %s", name, where)
        return
    try:
        drop_db_sql(scratch)  # refuses anything but a scratch name
        pg_drop.drop_database(admin, scratch, timeout=300)
        result.notes.append(f"scratch database {scratch} dropped")
    except LabkeeperError as exc:
        result.fail(f"could not drop scratch database {where}: {exc}")
