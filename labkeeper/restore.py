"""Restores for real (the runbooks' restore-database and restore-guest).

A database is restored from a chosen snapshot (default: the latest complete
backup) into a *new* database ``<dbname>_restored_<stamp>`` on the database's own
server, streamed from restic (no temporary file), and verified against the
backup's manifest: every table with exactly its recorded row count. Swapping it
in place of the original is a separate, explicit step (two renames in one
transaction; the original is kept as ``<dbname>_before_<stamp>``). labkeeper only
ever drops databases with those two shapes of name.

A guest is restored from a chosen vzdump archive (default: its newest) to a new
VMID, or over the original (stopped first; ``force``). A copy on a new VMID would
otherwise start with production's network, mounts and devices (an address
conflict, cron jobs and mailers running twice, two guests writing one host
directory): it is restored with ``onboot=0``, then its bind/device mount points and
passthrough devices are deleted and every NIC is unplugged (``link_down=1``, the
settings kept for review), and it is *not* started unless asked.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from labkeeper import drill, pg_backup, pg_container, pg_drop, postgres, restic
from labkeeper import progress as progress_mod
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, LabkeeperError, PermanentError
from labkeeper.inventory import Database, Inventory

logger = logging.getLogger(__name__)

_PG_IDENT_MAX = 63
_LABKEEPER_NAME = re.compile(r"^[a-z0-9_]+_(restored|before)_[0-9]{14}$")


class RestoreFailed(PermanentError):
    """A restore that did not produce a verified copy."""


def stamp(now: datetime | None = None) -> str:
    return (now or datetime.now(tz=UTC)).strftime("%Y%m%d%H%M%S")


def _derived_name(dbname: str, kind: str, when: str) -> str:
    if not re.fullmatch(r"[0-9]{14}", when):
        raise ValueError("stamp must be 14 digits (YYYYmmddHHMMSS)")
    clean = re.sub(r"[^a-z0-9_]", "_", dbname.lower()).strip("_") or "db"
    suffix = f"_{kind}_{when}"
    return clean[:_PG_IDENT_MAX - len(suffix)].rstrip("_") + suffix


def restored_name(dbname: str, when: str) -> str:
    """``<dbname>_restored_<stamp>`` (at most 63 bytes, a plain identifier)."""
    return _derived_name(dbname, "restored", when)


def aside_name(dbname: str, when: str) -> str:
    """``<dbname>_before_<stamp>``: where swap keeps the original."""
    return _derived_name(dbname, "before", when)


def is_labkeeper_copy(name: str) -> bool:
    return _LABKEEPER_NAME.fullmatch(name) is not None


def create_sql(name: str) -> str:
    if not is_labkeeper_copy(name):
        raise ValueError(f"refusing to create {name!r}: not a *_restored_<stamp> name")
    return f"CREATE DATABASE {postgres.quote_ident(name)} TEMPLATE template0;"


def drop_sql(name: str) -> str:
    """The only DROP DATABASE a runbook issues: restored copies and set-aside originals."""
    if not is_labkeeper_copy(name):
        raise ValueError(f"refusing to drop {name!r}: labkeeper drops only databases it "
                         "restored (*_restored_<stamp>) or set aside (*_before_<stamp>)")
    return f"DROP DATABASE IF EXISTS {postgres.quote_ident(name)} WITH (FORCE);"


def swap_sql(original: str, restored: str, aside: str) -> str:
    """Both renames in one transaction, after ending other sessions on the two databases
    (a rename needs them gone)."""
    q, lit = postgres.quote_ident, postgres.quote_literal
    return (
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname IN "  # noqa: S608 - quoted
        f"({lit(original)}, {lit(restored)}) AND pid <> pg_backend_pid();\n"
        "BEGIN;\n"
        f"ALTER DATABASE {q(original)} RENAME TO {q(aside)};\n"
        f"ALTER DATABASE {q(restored)} RENAME TO {q(original)};\n"
        "COMMIT;"
    )


def database_exists_sql(name: str) -> str:
    return f"SELECT count(*) FROM pg_database WHERE datname = {postgres.quote_literal(name)};"  # noqa: S608


# ----------------------------------------------------------------------------- database


@dataclass
class DatabaseRestore:
    database: str
    snapshot: str
    backup_id: str
    restored: str
    bytes: int = 0
    seconds: float = 0.0
    tables: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        return not self.problems


def admin_conn(inv: Inventory, db: Database) -> postgres.Conn:
    """The database's own server, maintenance database ``postgres`` (with the client
    matching the server)."""
    return pg_container.matching(pg_backup.conn_for(inv, db, dbname="postgres"))


def exists(inv: Inventory, db: Database, name: str) -> bool:
    rows = postgres.query(admin_conn(inv, db), database_exists_sql(name), timeout=60)
    return bool(rows) and rows[0][0].strip() == "1"


MIN_PREFIX = 8
_SNAPSHOT_PREFIX = re.compile(rf"[0-9a-f]{{{MIN_PREFIX},64}}")


def check_snapshot_ref(snapshot: str) -> str:
    """``latest`` or a snapshot id prefix of at least 8 hex digits (an empty or short
    prefix would match the oldest backup, or several)."""
    if snapshot == "latest" or _SNAPSHOT_PREFIX.fullmatch(snapshot):
        return snapshot
    raise ConfigError(f"snapshot: {snapshot!r} is neither `latest` nor a snapshot id of at "
                      f"least {MIN_PREFIX} lowercase hex digits (see `restic snapshots`)")


def match_backup(backups: list[pg_backup.StoredBackup], snapshot: str, *, series: str
                 ) -> pg_backup.StoredBackup:
    """The one complete backup whose dump or manifest snapshot id starts with
    ``snapshot`` (``latest``: the newest); refuses no match and several."""
    check_snapshot_ref(snapshot)
    if not backups:
        raise RestoreFailed(f"no complete backup (dump + manifest) of {series}")
    if snapshot == "latest":
        return backups[-1]
    found = [b for b in backups
             if any(i.startswith(snapshot) for i in (b.dump.id, b.manifest.id if b.manifest
                                                    else ""))]
    if len(found) > 1:
        raise ConfigError(f"snapshot: {snapshot!r} matches {len(found)} backups of {series} ("
                          + ", ".join(b.dump.id[:12] for b in found) + "): give more digits")
    if not found:
        raise RestoreFailed(f"snapshot {snapshot!r} is not a complete backup of {series} "
                            "(known: " + ", ".join(b.dump.id[:8] for b in backups) + ")")
    return found[0]


def pick_backup(inv: Inventory, db: Database, snapshot: str = "latest"
                ) -> tuple[restic.Repo, pg_backup.StoredBackup]:
    """The complete backup (dump + manifest) to restore: ``latest`` or the one whose dump
    or manifest snapshot id starts with ``snapshot`` (at least 8 hex digits, unique)."""
    check_snapshot_ref(snapshot)  # before any restic run
    repo = pg_backup.open_repo(inv, inv.repository_for(db).name)
    server = inv.database_server(db)
    backups = [b for b in pg_backup.find_backups(repo, lab=inv.lab.name, server=server,
                                                 name=db.name) if b.manifest]
    return repo, match_backup(backups, snapshot, series=f"db:{server}/{db.name}")


def restore_database(inv: Inventory, name: str, *, snapshot: str = "latest",
                     into: str | None = None) -> DatabaseRestore:
    """Restore ``snapshot`` of database ``name`` into a new database and verify it against
    the manifest. A failed or unverified restore drops the new database again and raises
    :class:`RestoreFailed` (nothing half-done is left behind)."""
    db = inv.database(name)
    into = into or restored_name(db.effective_dbname, stamp())
    if not is_labkeeper_copy(into):
        raise ConfigError(f"into: {into!r} is not a *_restored_<stamp> name")
    repo, backup = pick_backup(inv, db, snapshot)
    manifest = pg_backup.read_manifest(repo, backup)
    if manifest.dump is None:
        raise RestoreFailed(f"manifest of backup {backup.backup_id} does not describe its dump")
    result = DatabaseRestore(db.name, backup.dump.id[:8], backup.backup_id, into)
    admin = admin_conn(inv, db)
    if exists(inv, db, into):
        raise RestoreFailed(f"database {into} already exists; refusing to restore over it")
    logger.info("%s: restoring backup %s (snapshot %s, %s bytes) into new database %s", name,
                backup.backup_id, result.snapshot, manifest.dump.bytes, into)
    postgres.query(admin, create_sql(into), timeout=120)
    started = time.monotonic()
    try:
        target = pg_container.matching(pg_backup.conn_for(inv, db, dbname=into))
        with progress_mod.Progress(f"{name}: restore", total=manifest.dump.bytes,
                                   interval=inv.settings.progress_interval) as progress:
            outcome = drill.stream_restore(repo, backup.dump.id, manifest.dump.path, target,
                                           fmt=manifest.dump_format,
                                           timeout=db.timeout_minutes * 60,
                                           on_bytes=progress.add)
        result.bytes = outcome.bytes
        if outcome.bytes != manifest.dump.bytes:
            result.problems.append(f"{outcome.bytes} bytes streamed, manifest says "
                                   f"{manifest.dump.bytes}")
        result.problems += [f"restore error: {e}" for e in outcome.unexpected_errors[:5]]
        counts = drill.restored_counts(target)
        for check in drill.compare_tables(manifest.tables, counts):
            if not check.ok:
                result.problems.append(f"{check.name}: {check.detail}")
        result.tables = len(manifest.tables)
        result.seconds = time.monotonic() - started
    except BaseException:
        _drop_quietly(admin, into)
        raise
    if not result.verified:
        _drop_quietly(admin, into)
        raise RestoreFailed(f"restore of {name} from {result.snapshot} does not match its "
                            f"manifest ({len(result.problems)} problem(s)): "
                            + "; ".join(result.problems[:5]) + f"; {into} dropped")
    logger.info("%s: %s verified: %s tables with their manifest row counts, %s bytes in "
                "%.1f s", name, into, result.tables, result.bytes, result.seconds)
    return result


def _drop_quietly(admin: postgres.Conn, name: str) -> None:
    try:
        drop_sql(name)  # refuses anything labkeeper did not make
        pg_drop.drop_database(admin, name, timeout=300)
        logger.info("dropped %s", name)
    except LabkeeperError as exc:  # reported, the original failure wins
        logger.info("could not drop %s: %s", name, exc)


Made = Mapping[str, Collection[str]]
"""Database (inventory name) -> the databases this run created for it (restored copies,
set-aside originals): the only ones its swap and drop steps accept."""


def made_by_run(made: Made, name: str, target: str, *, field_name: str) -> None:
    """Refuse ``target`` unless this run created it for database ``name`` (a name that
    merely looks like a labkeeper copy may be another run's, or a person's)."""
    mine = [str(n) for n in made.get(name, ())]
    if target not in mine:
        raise ConfigError(f"{field_name}: {target!r} was not created for database {name} by "
                          "this run (it made: " + (", ".join(mine) or "nothing")
                          + "); swap and drop only act on this run's own copies")


def swap_database(inv: Inventory, name: str, restored: str, *, made: Made,
                  when: str | None = None) -> str:
    """Put ``restored`` (a copy this run restored, see :data:`Made`) in place of
    database ``name``; return where the original went."""
    db = inv.database(name)
    original = db.effective_dbname
    if not is_labkeeper_copy(restored) or "_restored_" not in restored:
        raise ConfigError(f"restored: {restored!r} is not a database labkeeper restored")
    made_by_run(made, name, restored, field_name="restored")
    aside = aside_name(original, when or stamp())
    if not exists(inv, db, restored):
        raise RestoreFailed(f"database {restored} does not exist")
    if exists(inv, db, aside):
        raise RestoreFailed(f"database {aside} already exists; refusing to swap")
    postgres.query(admin_conn(inv, db), swap_sql(original, restored, aside), timeout=120)
    logger.info("%s: %s is now %s; the previous %s is kept as %s", name, restored, original,
                original, aside)
    return aside


def drop_database(inv: Inventory, name: str, target: str, *, made: Made) -> bool:
    """Drop a restored copy or set-aside original of database ``name`` that this run
    made (see :data:`Made`)."""
    db = inv.database(name)
    drop_sql(target)  # refuses anything else
    made_by_run(made, name, target, field_name="name")
    present = exists(inv, db, target)
    pg_drop.drop_database(admin_conn(inv, db), target, timeout=300)
    logger.info("%s: dropped %s" if present else "%s: %s was not there", name, target)
    return present


# ----------------------------------------------------------------------------- guest


@dataclass(frozen=True)
class GuestRestore:
    guest: str
    archive: str
    vmid: int
    node: str
    over_original: bool
    seconds: float
    started: bool = False
    isolation: str = ""
    """What was done to a copy so it cannot reach production (empty over the original)."""


def isolate_copy(api: Any, node: str, vmid: int, gtype: px.GuestType) -> str:
    """Make a restored copy safe to exist next to the original: bind/device mount points
    and passthrough devices deleted, every NIC unplugged. Returns what was done."""
    config = px.guest_config(api, node, vmid, gtype).values
    delete = px.host_bound_keys(config)
    nics = px.unplugged_nics(config)
    if delete or nics:
        px.configure(api, node, vmid, gtype, nics, delete=delete)
    done = f"{len(nics)} NIC(s) unplugged (link_down=1)" if nics else "no NIC"
    return done + (f"; removed host mounts/devices {', '.join(delete)}" if delete else "")


def guest_archives(api: Any, inv: Inventory, vmid: int, node: str) -> list[px.StorageVolume]:
    assert inv.proxmox is not None
    out: list[px.StorageVolume] = []
    for storage in inv.proxmox.storages:
        if "backup" in storage.content:
            out += px.backups(api, node, storage.name, vmid=vmid)
    return sorted(out, key=lambda v: (v.ctime or 0, v.volid))


def pick_archive(api: Any, inv: Inventory, guest_name: str, archive: str = "latest"
                 ) -> px.StorageVolume:
    guest = inv.guest(guest_name)
    where = px.find_guest(api, guest.vmid)
    node = where.node if where is not None else guest.node
    volumes = guest_archives(api, inv, guest.vmid, node)
    if not volumes:
        raise RestoreFailed(f"no vzdump archive of guest {guest.name} ({guest.vmid}) on "
                            f"node {node}")
    if archive == "latest":
        return volumes[-1]
    for v in volumes:
        if v.volid == archive:
            return v
    raise RestoreFailed(f"archive {archive!r} is not a backup of guest {guest.name} "
                        f"(known: {', '.join(v.volid for v in volumes)})")


def restore_guest(inv: Inventory, name: str, *, archive: str = "latest", vmid: int = 0,
                  over_original: bool = False, start: bool | None = None, api: Any = None
                  ) -> GuestRestore:
    """Restore guest ``name`` from ``archive`` to ``vmid`` (0: the next free VMID),
    isolated (:func:`isolate_copy`) and left stopped unless ``start``; or over the
    original (stopped first, started again unless ``start`` is false)."""
    start = over_original if start is None else start
    api = api if api is not None else px.connect_lab(inv.proxmox)
    assert inv.proxmox is not None
    guest = inv.guest(name)
    timeout = float(inv.proxmox.task_timeout)
    vol = pick_archive(api, inv, name, archive)
    started = time.monotonic()
    current = px.find_guest(api, guest.vmid)
    node = current.node if current is not None else guest.node
    if over_original:
        target = guest.vmid
        if current is not None and current.status == "running":
            logger.info("%s: stopping VMID %s before restoring over it", name, target)
            px.wait_for_task(api, px.stop_guest(api, node, target, guest.type), timeout=timeout)
    else:
        if vmid and vmid == guest.vmid:
            raise ConfigError(f"vmid: {vmid} is the original's; restoring over it needs "
                              "over_original (and its approval)")
        if vmid and px.find_guest(api, vmid) is not None:
            raise ConfigError(f"vmid: {vmid} is already in use")
        target = px.next_vmid(api, vmid or None)
    logger.info("%s: restoring %s to VMID %s on %s%s", name, vol.volid, target, node,
                " (over the original)" if over_original else "")
    restore = px.restore_lxc if guest.type == "lxc" else px.restore_qemu
    upid = restore(api, node, target, vol.volid, storage=guest.resources.storage,
                   force=True if over_original else None,
                   unique=None if over_original else True,
                   options=None if over_original else {"onboot": 0})
    px.wait_for_task(api, upid, timeout=timeout)
    isolation = ""
    if not over_original:
        isolation = isolate_copy(api, node, target, guest.type)
        logger.info("%s: copy VMID %s isolated: %s%s", name, target, isolation,
                    "" if start else "; left stopped")
    if start:
        px.wait_for_task(api, px.start_guest(api, node, target, guest.type), timeout=timeout)
    return GuestRestore(guest.name, vol.volid, target, node, over_original,
                        time.monotonic() - started, started=start, isolation=isolation)
