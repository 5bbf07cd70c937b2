"""Copy a database out of a point-in-time scratch cluster onto a PostgreSQL server.

The recovery always runs in a scratch cluster on this host (:mod:`labkeeper.pitr.restore`);
what an operator wants afterwards is *one database* back somewhere real:

- **onto the live server** (runbook ``pitr-restore-database``): the database as of the
  target lands beside the original as ``<db>_pitr_<YYYYmmddHHMM>`` (:func:`live_copy`);
  :func:`compare_copy` shows what it holds against the live one; only after approval
  :func:`swap_in` renames the original to ``<db>_before_pitr_<same stamp>`` and the copy
  to the original's name (both renames in one transaction, as ``restore-database``
  does); :func:`swap_back` undoes that, :func:`drop_copy` drops a copy not swapped in;
- **onto a drill server** (``labkeeper restore pitr --on``): each recovered database
  becomes a ``labkeeper_drill_*`` scratch database there (:func:`drill_copies`).

The copy is ``pg_dump -Fc`` over the scratch cluster's private socket piped into
``pg_restore`` (one :func:`labkeeper.process.pipeline`, no temporary file), into a
database created for it; it counts only when every table holds exactly the scratch
cluster's row count. The scratch cluster is removed in every case. Names are checked
shapes, quoted with :func:`labkeeper.postgres.quote_ident`; no inventory or runbook
value reaches SQL or a shell as text.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labkeeper import pg_container, pg_drop, postgres, process, restore
from labkeeper.drill.database import drill_conn, is_scratch_db, scratch_db_name
from labkeeper.drill.pgrestore import PG_RESTORE_CODES, restore_errors, restored_counts
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.inventory import Database, Inventory
from labkeeper.inventory.pitr import pitr_database, pitr_server
from labkeeper.pitr import PitrError, scratch
from labkeeper.pitr import restore as pitr_restore
from labkeeper.pitr import target as pitr_target

logger = logging.getLogger(__name__)

_PG_IDENT_MAX = 63
_PRIVILEGE = re.compile(r"permission denied for|must be (a )?(owner|member|superuser)|"
                        r"must be able to SET ROLE|role \"[^\"]+\" does not exist")
"""Ownership and grants the copying role may not restore (a GRANT on a system function,
an owner it cannot become): reported with the copy, not a failure (the row counts prove
the data)."""
_STAMP = re.compile(r"[0-9]{12}")
Counts = dict[tuple[str, str], int]

# -- names (pure) ------------------------------------------------------------------------


def _clean(dbname: str) -> str:
    return re.sub(r"[^a-z0-9_]", "_", dbname.lower()).strip("_") or "db"


def _named(dbname: str, kind: str, stamp: str) -> str:
    if not _STAMP.fullmatch(stamp):
        raise ValueError("stamp must be 12 digits (YYYYmmddHHMM)")
    suffix = f"_{kind}_{stamp}"
    return _clean(dbname)[:_PG_IDENT_MAX - len(suffix)].rstrip("_") + suffix


def minute_stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(tz=UTC)).strftime("%Y%m%d%H%M")


def copy_name(dbname: str, stamp: str) -> str:
    """``<db>_pitr_<YYYYmmddHHMM>``: the copy on the live server (≤ 63 bytes)."""
    return _named(dbname, "pitr", stamp)


def aside_name(dbname: str, copy: str) -> str:
    """``<db>_before_pitr_<stamp of the copy>``: where the swap keeps the original."""
    return _named(dbname, "before_pitr", stamp_of(dbname, copy))


def stamp_of(dbname: str, copy: str) -> str:
    """The stamp of ``copy`` when it is a copy of ``dbname`` (else ConfigError): swap,
    swap back and drop act on nothing else."""
    m = re.fullmatch(r"[a-z0-9_]+_pitr_([0-9]{12})", copy)
    if m is None or copy != copy_name(dbname, m.group(1)):
        raise ConfigError(f"{copy!r} is not a point-in-time copy of {dbname} (expected "
                          f"{_clean(dbname)}_pitr_<YYYYmmddHHMM>)")
    return m.group(1)


def create_sql(name: str) -> str:
    if not (re.fullmatch(r"[a-z0-9_]+_pitr_[0-9]{12}", name) or is_scratch_db(name)):
        raise ValueError(f"refusing to create {name!r}: not a *_pitr_<stamp> or drill name")
    return f"CREATE DATABASE {postgres.quote_ident(name)} TEMPLATE template0;"


def dump_argv(cluster: scratch.ScratchCluster, dbname: str) -> tuple[str, ...]:
    """pg_dump of one database of the scratch cluster, custom format, uncompressed (the
    pipe is local), over its private socket as the cluster's superuser."""
    return scratch.as_postgres((
        str(cluster.bindir / "pg_dump"), "--no-password", "-Fc", "-Z", "0",
        "-h", str(cluster.sockdir), "-p", str(cluster.port), "-U", cluster.superuser,
        "-d", dbname))


def describe_counts(counts: Counts) -> str:
    return ", ".join(f"{s}.{t}: {n}" for (s, t), n in sorted(counts.items())) or "no tables"


def count_differences(copy: Counts, live: Counts) -> list[str]:
    """Per table: rows in the copy vs now in the live database (pure)."""
    out = []
    for key in sorted(set(copy) | set(live)):
        a, b = copy.get(key), live.get(key)
        if a != b:
            shown = f"{key[0]}.{key[1]}"
            out.append(f"{shown}: {'absent' if a is None else a} in the copy, "
                       f"{'absent' if b is None else b} now ({(a or 0) - (b or 0):+d})")
    return out


# -- the copy ----------------------------------------------------------------------------

@dataclass
class CopyResult:
    source: str
    """The database in the scratch cluster."""
    into: str
    where: str
    counts: Counts = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0
    expected_errors: list[str] = field(default_factory=list)
    """Ownership and grant statements the role could not restore."""

    @property
    def rows(self) -> int:
        return sum(self.counts.values())

    @property
    def privileges(self) -> str:
        if not self.expected_errors:
            return "ownership and grants restored"
        return (f"{len(self.expected_errors)} ownership/grant statement(s) not restored "
                "(the role lacks the rights), e.g. " + self.expected_errors[0])


def scratch_counts(cluster: scratch.ScratchCluster, dbname: str) -> Counts:
    present = [(r[0], r[1]) for r in cluster.query(postgres.TABLES_SQL, db=dbname)]
    if not present:
        return {}
    rows = cluster.query(postgres.row_counts_sql(present), db=dbname, timeout=600)
    return {(r[0], r[1]): int(r[2]) for r in rows}


def copy_database(cluster: scratch.ScratchCluster, source: str, admin: postgres.Conn,
                  into: str, *, where: str, timeout: float) -> CopyResult:
    """Create ``into`` through ``admin`` (a maintenance connection of the server) and
    fill it with ``source`` of the scratch cluster; proven by row counts. Any failure
    drops ``into`` again and raises :class:`PitrError`."""
    postgres.query(admin, create_sql(into), timeout=120)
    dest = replace(admin, dbname=into)
    try:
        res = _pipe(cluster, source, dest, timeout=timeout)
        res.where = where
        res.into = into
        want = scratch_counts(cluster, source)
        res.counts = restored_counts(dest)
        diff = count_differences(res.counts, want)
        if diff:
            raise PitrError(f"copy of {source} into {into} is incomplete: " + "; ".join(diff[:5]))
    except BaseException:
        _drop_quietly(admin, into)
        raise
    logger.info("%s: copied into %s on %s: %d table(s), %d row(s)", source, into, where,
                len(res.counts), res.rows)
    return res


def _pipe(cluster: scratch.ScratchCluster, source: str, dest: postgres.Conn, *,
          timeout: float) -> CopyResult:
    dump = process.Stage(dump_argv(cluster, source), codes=postgres.PG_DUMP_CODES)
    load = process.Stage(dest.argv(("pg_restore", "--no-password", *dest.conn_args())),
                         codes=PG_RESTORE_CODES, env=dest.env())
    res = process.pipeline([dump, load], timeout=timeout, check=False)
    d_res, l_res = res.stages
    nbytes = res.bytes_relayed[0]
    if res.timed_out or res.cause is not None:
        failed = d_res if res.cause == 0 else l_res
        err = process.make_error(failed)
        raise PitrError(f"copy of {source} failed after {nbytes} bytes: "
                        f"{postgres.name_server(str(err), dest)}", transient=err.transient)
    expected, unexpected = restore_errors(l_res.stderr)
    expected += [e for e in unexpected if _PRIVILEGE.search(e)]
    unexpected = [e for e in unexpected if not _PRIVILEGE.search(e)]
    if unexpected:
        raise PitrError(f"copy of {source}: pg_restore reported {len(unexpected)} error(s): "
                        + " | ".join(unexpected[:3]))
    return CopyResult(source=source, into=dest.dbname, where="", bytes=nbytes,
                      seconds=res.duration, expected_errors=expected)


def _drop_quietly(admin: postgres.Conn, name: str) -> None:
    try:
        create_sql(name)  # refuses any name labkeeper does not make
        pg_drop.drop_database(admin, name, timeout=300)
        logger.info("dropped %s", name)
    except LabkeeperError as exc:  # reported; the original failure wins
        logger.warning("could not drop %s: %s", name, exc)


# -- the scratch cluster, removed in every case ------------------------------------------

@contextmanager
def recovered(target: pitr_target.PitrTarget, to: str, *, timeout: float
              ) -> Iterator[pitr_restore.RestoreResult]:
    """The server recovered to ``to`` in a new scratch cluster on this host (next to
    the spool), removed whatever happens."""
    base = Path(target.spool).parent / "restores"
    base.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="copy-", dir=base))
    res: pitr_restore.RestoreResult | None = None
    try:
        res = pitr_restore.restore_pitr(target, pitr_restore.parse_target(to),
                                        workdir / "cluster", timeout=timeout)
        yield res
    finally:
        if res is not None and res.cluster is not None:
            res.cluster.destroy()
        else:
            _stop_leftover(workdir / "cluster")
        shutil.rmtree(workdir, ignore_errors=True)
        logger.info("%s: scratch cluster %s removed", target.name, workdir)


def _stop_leftover(workdir: Path) -> None:
    """A restore interrupted while its cluster ran: stop it before its directory goes."""
    cluster = scratch.ScratchCluster(workdir, Path(), 0)
    try:
        major = int((cluster.datadir / "PG_VERSION").read_text().strip())
        cluster.bindir = scratch.bindir_for(major)
        cluster.stop()
    except (OSError, ValueError, LabkeeperError) as exc:
        logger.debug("no scratch cluster to stop in %s (%s)", workdir, exc)


def reached(res: pitr_restore.RestoreResult) -> str:
    o = res.outcome
    stop = o.stopped or f"end of the archived WAL at {o.redo_done_lsn}"
    return f"{stop}; last replayed commit {o.last_commit_time or 'unknown'}"


# -- onto the live server (runbook pitr-restore-database) --------------------------------

def _live(inv: Inventory, server: str, database: str) -> tuple[Database, postgres.Conn]:
    """The inventory database (on the PITR server) and its server's maintenance conn."""
    srv = pitr_server(inv, server)
    db = inv.database(database)
    if inv.database_server(db) != inv.database_server(pitr_database(inv, srv)):
        raise ConfigError(f"database {database} is on {inv.database_server(db)}, not on pitr "
                          f"server {server} ({inv.database_server(pitr_database(inv, srv))})")
    return db, restore.admin_conn(inv, db)


def _exists(admin: postgres.Conn, name: str) -> bool:
    rows = postgres.query(admin, restore.database_exists_sql(name), timeout=60)
    return bool(rows) and rows[0][0].strip() == "1"


@dataclass
class LiveCopy:
    server: str
    database: str
    to: str
    copy: str
    reached: str
    base_backup_id: str
    counts: str
    rows: int
    seconds: float
    privileges: str = ""

    def outputs(self) -> dict[str, Any]:
        return {"copy": self.copy, "reached": self.reached, "counts": self.counts,
                "rows": self.rows, "base_backup_id": self.base_backup_id, "to": self.to,
                "privileges": self.privileges}


def plan_live(inv: Inventory, server: str, database: str, to: str) -> str:
    """What the copy step would do (read-only: the repository is listed, nothing else)."""
    db, _admin = _live(inv, server, database)
    target = pitr_target.resolve(inv, server, match_client=False)
    when = pitr_restore.parse_target(to)
    snaps = pitr_target.list_server(target)
    base = pitr_restore.choose_base(pitr_target.complete_bases(snaps), when)
    plan = pitr_restore.plan_wal(base, pitr_target.wal_batches(snaps), when)
    return (f"recover {server} to {when} in a scratch cluster on this host (base backup "
            f"{base.backup_id} + {len(plan.names)} WAL segment(s)), copy "
            f"{db.effective_dbname} from it onto the live server as "
            f"{copy_name(db.effective_dbname, minute_stamp())}, remove the scratch cluster")


def live_copy(inv: Inventory, server: str, database: str, to: str, *,
              stamp: str | None = None, timeout: float = 3600) -> LiveCopy:
    """Recover ``server`` to ``to`` in a scratch cluster and copy ``database`` onto the
    live server as a new database; the live database itself is not touched."""
    db, admin = _live(inv, server, database)
    into = copy_name(db.effective_dbname, stamp or minute_stamp())
    if _exists(admin, into):
        raise PitrError(f"database {into} already exists on the live server; refusing to "
                        "copy over it")
    target = pitr_target.resolve(inv, server, match_client=False)
    with recovered(target, to, timeout=timeout) as res:
        assert res.cluster is not None
        got = copy_database(res.cluster, db.effective_dbname, admin, into,
                            where=f"the live server {admin.address}", timeout=timeout)
    return LiveCopy(server=server, database=database, to=res.target, copy=into,
                    reached=reached(res), base_backup_id=res.base_backup_id,
                    counts=describe_counts(got.counts), rows=got.rows,
                    seconds=res.duration_s + got.seconds, privileges=got.privileges)


def compare_copy(inv: Inventory, database: str, copy: str) -> dict[str, Any]:
    """Row counts of the copy against the live database now (read-only)."""
    db = inv.database(database)
    stamp_of(db.effective_dbname, copy)
    admin = restore.admin_conn(inv, db)
    if not _exists(admin, copy):
        raise PitrError(f"the copy {copy} does not exist")
    mine = restored_counts(replace(admin, dbname=copy))
    live = restored_counts(replace(admin, dbname=db.effective_dbname))
    diff = count_differences(mine, live)
    summary = (f"{copy}: {describe_counts(mine)}; against {db.effective_dbname} now: "
               + ("; ".join(diff) if diff else "the same row counts"))
    logger.info("%s", summary)
    return {"summary": summary, "copy_rows": sum(mine.values()),
            "live_rows": sum(live.values()), "differences": len(diff)}


def swap_in(inv: Inventory, database: str, copy: str) -> str:
    """Rename the live database to ``<db>_before_pitr_<stamp>`` and ``copy`` to its
    name, in one transaction; returns the aside name."""
    db = inv.database(database)
    original = db.effective_dbname
    aside = aside_name(original, copy)
    admin = restore.admin_conn(inv, db)
    if not _exists(admin, copy):
        raise PitrError(f"the copy {copy} does not exist")
    if _exists(admin, aside):
        raise PitrError(f"database {aside} already exists; refusing to swap")
    postgres.query(admin, restore.swap_sql(original, copy, aside), timeout=120)
    logger.info("%s: %s is now %s; the previous one is kept as %s", database, copy,
                original, aside)
    return aside


def swap_back(inv: Inventory, database: str, copy: str) -> str:
    """Undo :func:`swap_in`: the original back under its name, the copy under its own."""
    db = inv.database(database)
    original = db.effective_dbname
    aside = aside_name(original, copy)
    admin = restore.admin_conn(inv, db)
    if not _exists(admin, aside):
        return f"{aside} does not exist: nothing was swapped, {original} is untouched"
    if _exists(admin, copy):
        raise PitrError(f"both {aside} and {copy} exist: not a state swap_in leaves")
    postgres.query(admin, restore.swap_sql(original, aside, copy), timeout=120)
    logger.info("%s: swapped back: %s is the original again, the copy is %s", database,
                original, copy)
    return f"{original} is the original again; the copy is back as {copy}"


def drop_copy(inv: Inventory, database: str, copy: str) -> bool:
    """Drop a copy that was not swapped in (nothing else: its name is checked)."""
    db = inv.database(database)
    stamp_of(db.effective_dbname, copy)
    admin = restore.admin_conn(inv, db)
    present = _exists(admin, copy)
    pg_drop.drop_database(admin, copy, timeout=300)
    logger.info("%s: %s", database, f"dropped {copy}" if present else f"{copy} was not there")
    return present


# -- onto a drill server (labkeeper restore pitr --on) -----------------------------------

def recovered_databases(cluster: scratch.ScratchCluster) -> list[str]:
    rows = cluster.query("SELECT datname FROM pg_database WHERE NOT datistemplate AND "
                         "datname <> 'postgres' ORDER BY datname;")
    return [r[0] for r in rows]


def _wanted(inv: Inventory, present: list[str], databases: list[str] | None) -> list[str]:
    if not databases:
        return present
    out = []
    for name in databases:
        dbname = name if name in present else _effective(inv, name)
        if dbname not in present:
            raise PitrError(f"--database {name}: not in the recovered cluster (it holds: "
                            f"{', '.join(present) or 'nothing'})")
        out.append(dbname)
    return out


def _effective(inv: Inventory, name: str) -> str:
    try:
        return inv.database(name).effective_dbname
    except ConfigError:
        return name


def drill_copies(inv: Inventory, server: str, to: str, on: str, *,
                 databases: list[str] | None = None, timeout: float = 3600
                 ) -> tuple[pitr_restore.RestoreResult, list[CopyResult]]:
    """Recover ``server`` to ``to`` in a scratch cluster here, copy the recovered
    databases (all, or ``databases``) onto drill server ``on`` as ``labkeeper_drill_*``
    scratch databases (kept: the result names them), remove the scratch cluster."""
    drill_server = inv.drill_server(on)
    admin = pg_container.matching(drill_conn(inv, drill_server))
    target = pitr_target.resolve(inv, server, match_client=False)
    copies: list[CopyResult] = []
    with recovered(target, to, timeout=timeout) as res:
        assert res.cluster is not None
        for dbname in _wanted(inv, recovered_databases(res.cluster), databases):
            copies.append(copy_database(
                res.cluster, dbname, admin, scratch_db_name(dbname),
                where=f"drill server {drill_server.name} ({admin.address})", timeout=timeout))
    return res, copies
