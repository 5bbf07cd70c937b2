"""Disaster-recovery drills: restore for real, verify, measure RTO and RPO.

No Prefect here. Three drills, each returning a :class:`DrillResult` (never raising
for a drill that *failed*: the result says what failed and why; only an error that
may go away on retry — a repository backend that is down — is marked ``transient``):

**Database drill** (:func:`database_drill`)

1. The newest dump of the database's series that has its manifest
   (:func:`labkeeper.pg_backup.find_latest_backup`); RPO = age of the manifest's
   snapshot (the point in time the data is from), against ``drill.rpo_hours``.
2. A scratch database ``labkeeper_drill_<name>_<random>`` on the drill server
   (:func:`scratch_db_name`: the prefix no real database uses, a random suffix,
   ``CREATE DATABASE`` refuses an existing name, so it can never hit a real one).
3. Streamed restore, no temporary file: ``restic dump <snap> /<db>.sql | psql``
   (``| pg_restore`` for custom-format dumps) as one
   :func:`labkeeper.process.pipeline` with pipefail; ``restic dump`` carries the
   dump-complete gate, so a truncated dump never reaches psql's end-of-stream —
   psql is killed and the drill fails. Bytes streamed must equal the manifest's.
4. Verify: every manifest table exists with exactly its row count, no extra table,
   no unexpected restore error (errors about roles missing on the drill server —
   ``OWNER TO``/``GRANT`` — are expected and counted), the smoke queries return
   what they declare, the server's globals dump is present and complete when the
   inventory takes one.
5. RTO = start of the restore (CREATE DATABASE) → verified, against
   ``drill.rto_minutes``.
6. The scratch database is always dropped (``DROP DATABASE ... WITH (FORCE)``,
   only ever a ``labkeeper_drill_*`` name), unless the drill failed and
   ``keep_on_failure`` is set: then the result says where it is.

**Guest drill** (:func:`guest_drill`):

1. **Sweep** (:func:`sweep_scratch`): a drill that died leaves its scratch copy
   behind. Every copy is *marked in the restore call itself* — tag
   ``labkeeper-drill`` and a description ending in ``labkeeper-drill-scratch
   created=<UTC time>`` — so even a drill killed mid-restore leaves a marked guest.
   Guests of ``drills.guests.scratch_vmids`` (never an inventory guest) with the tag
   *and* the marker, older than ``stale_scratch_hours`` (younger ones may belong
   to a drill still running) are stopped and destroyed, and the result says so.
   Copies tagged ``labkeeper-drill-kept`` (keep_on_failure) are reported, never
   destroyed; a tagged guest without the marker is reported and left alone; an
   unmarked guest is never touched.
2. The guest's newest vzdump archive restored to a free VMID of the scratch range
   (checked against the cluster and the inventory; never ``force``) with the
   marker, only the drill's tag (the original's tags could let tag-selected jobs
   pick the copy up), ``onboot=0`` and ``protection=0``; every NIC detached (or
   moved to the isolated ``drills.guests.bridge``); bind/device mount points and
   passthrough devices deleted (:func:`labkeeper.proxmox.host_bound_keys`: the copy
   must not write the original's host directories or grab its devices); started.
3. **Up?** ``check: status``: PVE says it runs within ``boot_timeout``. ``ssh``: it
   runs and an SSH login (the guest's ssh settings) to ``drill.address`` — the
   copy's address on the drill bridge — succeeds. ``probe``: it runs and the
   drill's http / tcp / command probe passes against the copy. SSH and probes are
   retried until ``boot_timeout`` (an authentication or host-key refusal is not
   retried). Without a bridge, or without ``address`` where one is needed, the
   check *fails*: it is never silently downgraded to ``status``, and the guest's
   own address is never used (it would reach the original, not the copy).
   (In the local lab the simulator has no guest OS: the lab's sshd stands in for
   the copy's sshd, as it does for every simulated guest, and a command probe can
   read the copy's restored root filesystem, which the simulator unpacks from
   the archive on this machine.)
4. RTO = restore → checked; destroyed unless it failed and keep_on_failure (then
   tagged ``labkeeper-drill-kept``).

**Repository drill** (:func:`repository_drill`): ``restic check
--read-data-subset=n/N`` with ``n`` rotating over ``read_data_period`` drills (the
position is kept under ``settings.state_dir``; it advances only after a clean
check), and one random snapshot: every file's ``restic dump`` hashed (sha256) and
sized against ``restic ls``, then restored again by ``restic restore --verify``
and hashed: both must agree byte for byte.

**Path-set drill** (:mod:`labkeeper.drill_paths`, target ``paths:<host>/<set>``): a
random sample of the set's latest snapshot restored and compared by SHA-256 with
the files on the host over SSH; changed-since-backup files reported, not failed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets as pysecrets
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from labkeeper import health, pg_backup, pg_container, postgres, process, restic
from labkeeper import progress as progress_mod
from labkeeper.errors import (
    CommandError,
    ConfigError,
    LabkeeperError,
    TransientError,
)
from labkeeper.inventory import (
    DRILL_DB_PREFIX,
    Database,
    DrillServer,
    Guest,
    GuestDrill,
    GuestSsh,
    Inventory,
    PathBackup,
    SmokeQuery,
    SshTargetSpec,
)
from labkeeper.inventory_pitr import pitr_server
from labkeeper.process import ExitCode, ExitCodeTable
from labkeeper.secrets import redact, resolve
from labkeeper.ssh import SshTarget, connect

Log = Callable[[str], None]

SCRATCH_TAG = "labkeeper-drill"
"""Tag of every scratch copy a guest drill restores (set in the restore call)."""
KEPT_TAG = "labkeeper-drill-kept"
"""Added to a failed drill's copy kept for inspection: never swept."""
STALL_TIMEOUT = 300.0


def _nolog(_: str) -> None:
    pass


# =====================================================================================
# results
# =====================================================================================


@dataclass
class Check:
    """One thing a drill verified."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class DrillResult:
    """What one drill did. ``status`` is ``passed`` only when every check passed, no
    error happened and no objective was breached."""

    kind: str  # database | guest | repository | paths
    target: str
    started_at: datetime = field(default_factory=lambda: datetime.now(tz=UTC))
    checks: list[Check] = field(default_factory=list)
    rpo_s: float | None = None
    rpo_objective_s: float | None = None
    rto_s: float | None = None
    rto_objective_s: float | None = None
    source: str = ""
    """What was restored: a snapshot id, an archive volid."""
    scratch: str = ""
    """Where it was restored: a scratch database, a scratch VMID."""
    kept: str = ""
    """Set when the scratch copy was kept (keep_on_failure): where it is."""
    error: str = ""
    transient: bool = False
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, redact(detail)))
        return ok

    def fail(self, message: str, *, transient: bool = False) -> None:
        message = redact(message)
        self.error = f"{self.error}; {message}" if self.error else message
        self.transient = self.transient or transient

    @property
    def rpo_breached(self) -> bool:
        return (self.rpo_s is not None and self.rpo_objective_s is not None
                and self.rpo_s > self.rpo_objective_s)

    @property
    def rto_breached(self) -> bool:
        return (self.rto_s is not None and self.rto_objective_s is not None
                and self.rto_s > self.rto_objective_s)

    @property
    def breaches(self) -> list[str]:
        out = []
        if self.rpo_breached:
            out.append(f"RPO {_dur(self.rpo_s)} > objective {_dur(self.rpo_objective_s)}")
        if self.rto_breached:
            out.append(f"RTO {_dur(self.rto_s)} > objective {_dur(self.rto_objective_s)}")
        return out

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def passed(self) -> bool:
        return not self.error and not self.failed_checks and not self.breaches

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}"

    def summary(self) -> str:
        """One line: why it failed, or what passed."""
        if self.passed:
            return f"{len(self.checks)} check(s) passed"
        parts = []
        if self.error:
            parts.append(self.error)
        parts += [f"{c.name}: {c.detail}" for c in self.failed_checks]
        parts += self.breaches
        return redact("; ".join(parts))

    def row(self) -> dict[str, Any]:
        return {
            "drill": self.kind, "target": self.target, "status": self.status,
            "rpo": _dur(self.rpo_s), "rpo objective": _dur(self.rpo_objective_s),
            "rto": _dur(self.rto_s), "rto objective": _dur(self.rto_objective_s),
            "source": self.source, "scratch": self.scratch,
            "checks": f"{len(self.checks) - len(self.failed_checks)}/{len(self.checks)}",
            "kept": self.kept, "detail": self.summary(),
            "notes": redact("; ".join(self.notes)),
        }


def objective_checks(result: DrillResult) -> None:
    if result.rto_s is not None:
        result.check("rto", not result.rto_breached,
                     f"{_dur(result.rto_s)} (objective {_dur(result.rto_objective_s)})")
    if result.rpo_s is not None:
        result.check("rpo", not result.rpo_breached,
                     f"{_dur(result.rpo_s)} (objective {_dur(result.rpo_objective_s)})")


def _dur(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class DrillFailed(LabkeeperError):
    """A drill failed for a reason worth retrying (raised by the task wrappers so
    Prefect retries it); carries the result."""

    def __init__(self, result: DrillResult) -> None:
        super().__init__(f"{result.label}: {result.summary()}", transient=result.transient)
        self.result = result

    def __reduce__(self) -> tuple[Any, ...]:
        return (DrillFailed, (self.result,))


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
# argv builders (pure) — new restic/psql commands the drill needs
# =====================================================================================


def psql_restore_argv(conn: postgres.Conn) -> tuple[str, ...]:
    """psql applying a plain dump from stdin. No ON_ERROR_STOP: every statement is
    tried and every error is reported on stderr, where the drill classifies it
    (a role missing on the drill server is expected; anything else fails the drill)."""
    return conn.argv(("psql", "-X", "-q", "--no-password", "-v", "ON_ERROR_STOP=0",
                      *conn.conn_args(), "-f", "-"))


PG_RESTORE_CODES = ExitCodeTable("pg_restore", {
    0: ExitCode("success", "ok"),
    # 1 with "errors ignored on restore: N": the errors are on stderr and classified.
    1: ExitCode("errors during restore", "warning"),
})


def pg_restore_argv(conn: postgres.Conn) -> tuple[str, ...]:
    """pg_restore of a custom-format archive from stdin (serial: a pipe cannot seek)."""
    return conn.argv(("pg_restore", "--no-password", *conn.conn_args()))


def restore_argv(repo: restic.Repo, snapshot_id: str, target: str,
                 include: str) -> tuple[str, ...]:
    """``restic restore`` of one path of a snapshot, reading back what it wrote."""
    return (*repo.base_argv(), "restore", "--no-lock", snapshot_id, "--target", target,
            "--include", include, "--verify")


def sha256_argv() -> tuple[str, ...]:
    return ("sha256sum", "-b", "-")


# =====================================================================================
# restore-error classification (pure)
# =====================================================================================

_EXPECTED_ERRORS = (
    re.compile(r'role "[^"]+" does not exist'),
    re.compile(r'must be (a )?member of role "[^"]+"'),
    re.compile(r"must be owner of (schema|extension) "),
)


def restore_errors(stderr: str) -> tuple[list[str], list[str]]:
    """``(expected, unexpected)`` error lines of a psql/pg_restore run. Expected:
    ownership and grants naming roles the drill server does not have."""
    expected: list[str] = []
    unexpected: list[str] = []
    for line in stderr.splitlines():
        if "ERROR:" not in line and "FATAL:" not in line and "error:" not in line:
            continue
        if "errors ignored on restore" in line:
            continue
        (expected if any(p.search(line) for p in _EXPECTED_ERRORS) else unexpected).append(
            line.strip())
    return expected, unexpected


def compare_tables(manifest: Sequence[pg_backup.TableCount],
                   restored: dict[tuple[str, str], int]) -> list[Check]:
    """Every manifest table must be restored with exactly its row count; a restored
    table the manifest does not list is a mismatch too (same snapshot)."""
    checks: list[Check] = []
    listed = {(t.schema_name, t.name) for t in manifest}
    for t in manifest:
        key = (t.schema_name, t.name)
        shown = f"{t.schema_name}.{t.name}"
        if key not in restored:
            checks.append(Check(f"table {shown}", False,
                                f"missing from the restore (manifest: {t.rows} rows)"))
        elif restored[key] != t.rows:
            checks.append(Check(f"table {shown}", False,
                                f"{restored[key]} rows restored, manifest says {t.rows}"))
        else:
            checks.append(Check(f"table {shown}", True, f"{t.rows} rows"))
    for key in sorted(set(restored) - listed):
        checks.append(Check(f"table {key[0]}.{key[1]}", False,
                            "restored but not in the manifest"))
    return checks


def judge_smoke(query: SmokeQuery, rows: list[list[str]]) -> tuple[bool, str]:
    """Does a smoke query's result satisfy its min / max / equals?"""
    if len(rows) != 1 or len(rows[0]) != 1:
        return False, f"expected one value, got {len(rows)} row(s)"
    value = rows[0][0].strip()
    if query.equals is not None and value != query.equals:
        return False, f"returned {value!r}, expected {query.equals!r}"
    if query.min is not None or query.max is not None:
        try:
            number = float(value)
        except ValueError:
            return False, f"returned {value!r}, not a number"
        if query.min is not None and number < query.min:
            return False, f"returned {value}, expected ≥ {query.min}"
        if query.max is not None and number > query.max:
            return False, f"returned {value}, expected ≤ {query.max}"
    return True, f"returned {value}"


# =====================================================================================
# database drill
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


@dataclass(frozen=True)
class RestoreOutcome:
    """What the streamed restore did (for the drill and the benchmark)."""

    bytes: int
    duration: float
    expected_errors: list[str]
    unexpected_errors: list[str]


def stream_restore(repo: restic.Repo, snapshot_id: str, path: str, conn: postgres.Conn, *,
                   fmt: str = "plain", timeout: float, stall_timeout: float = STALL_TIMEOUT,
                   on_bytes: Callable[[int], None] | None = None) -> RestoreOutcome:
    """``restic dump <snapshot> <path> | psql`` (or ``| pg_restore``) into ``conn``'s
    database, no temporary file. The dump must end complete (gate on restic's
    stream) or psql is killed before end-of-stream. Raises :class:`LabkeeperError`
    (transient for a backend that went away) on any stage failing. ``on_bytes`` gets
    each chunk's size (progress)."""
    gate = postgres.plain_dump_complete if fmt == "plain" else postgres.custom_dump_complete
    producer = process.Stage(restic.dump_argv(repo, snapshot_id, path),
                             codes=restic.EXIT_CODES, env=repo.env(), eof_gate=gate,
                             on_bytes=on_bytes)
    if fmt == "plain":
        consumer = process.Stage(psql_restore_argv(conn), codes=postgres.PSQL_CODES,
                                 env=conn.env())
    else:
        consumer = process.Stage(pg_restore_argv(conn), codes=PG_RESTORE_CODES,
                                 env=conn.env())
    res = process.pipeline([producer, consumer], timeout=timeout, stall_timeout=stall_timeout,
                           check=False)
    p_res, c_res = res.stages
    nbytes = res.bytes_relayed[0]
    if res.timed_out or res.stalled:
        raise TransientError(f"restore {'timed out' if res.timed_out else 'stalled'} after "
                             f"{nbytes} bytes ({c_res.meaning})")
    if res.refused[0] is not None:
        raise LabkeeperError(
            f"the dump in snapshot {snapshot_id[:8]} is incomplete ({res.refused[0]}) after "
            f"{nbytes} bytes: psql was stopped before end-of-stream", transient=False)
    if res.cause == 0:
        err = restic.classify_failure(process.make_error(p_res))
        raise LabkeeperError(f"restic dump of {snapshot_id[:8]}:{path} failed after {nbytes} "
                             f"bytes: {err}", transient=err.transient)
    if res.cause == 1:
        err = process.make_error(c_res)
        raise LabkeeperError(f"{c_res.argv[0]} failed after {nbytes} bytes: "
                             f"{postgres.name_server(str(err), conn)}",
                             transient=err.transient)
    expected, unexpected = restore_errors(c_res.stderr)
    return RestoreOutcome(bytes=nbytes, duration=res.duration, expected_errors=expected,
                          unexpected_errors=unexpected)


def restored_counts(conn: postgres.Conn, tables: Sequence[tuple[str, str]] | None = None, *,
                    timeout: float = 600) -> dict[tuple[str, str], int]:
    """Exact row counts of every user table of ``conn``'s database."""
    present = [(r[0], r[1]) for r in postgres.query(conn, postgres.TABLES_SQL, timeout=60)]
    if not present:
        return {}
    rows = postgres.query(conn, postgres.row_counts_sql(present), timeout=timeout)
    return {(r[0], r[1]): int(r[2]) for r in rows}


def _check_globals(inv: Inventory, db: Database, repo: restic.Repo, result: DrillResult,
                   log: Log) -> None:
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
    log(f"globals of {label}: {newest.short_id} complete")


def database_drill(inv: Inventory, name: str, *, log: Log = _nolog,
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
        _database_drill(inv, db, result, keep=keep, log=log, clock=clock)
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    result.duration_s = time.monotonic() - started
    log(f"database drill {name}: {result.status.upper()} — {result.summary()}")
    return result


def _database_drill(inv: Inventory, db: Database, result: DrillResult, *, keep: bool,
                    log: Log, clock: Callable[[], datetime]) -> None:
    name = db.name
    repo_cfg = inv.repository_for(db)
    repo = pg_backup.open_repo(inv, repo_cfg.name)
    server = inv.database_server(db)
    backup = pg_backup.find_latest_backup(repo, lab=inv.lab.name, server=server, name=name)
    if backup is None:
        result.fail(f"no complete backup (dump + manifest) of db:{server}/{name} in "
                    f"repository {repo_cfg.name}")
        return
    manifest = pg_backup.read_manifest(repo, backup)
    if manifest.dump is None:
        result.fail(f"manifest of backup {backup.backup_id} does not describe its dump")
        return
    result.source = backup.dump.short_id or backup.dump.id[:8]
    result.rpo_s = max(0.0, (clock() - manifest.created_at).total_seconds())
    log(f"{name}: latest backup {backup.backup_id} (snapshot {result.source}, "
        f"{manifest.dump.bytes} bytes, {manifest.table_count} tables), RPO "
        f"{_dur(result.rpo_s)} (objective {_dur(result.rpo_objective_s)})")
    result.check("backup", True, f"backup {backup.backup_id} from "
                                 f"{manifest.created_at.isoformat(timespec='seconds')}")
    # The manifest names its dump by id: full since ids were made canonical, restic
    # 0.14's short one in manifests written before; same_id accepts both.
    result.check("manifest names dump", restic.same_id(manifest.dump.snapshot_id, backup.dump.id),
                 f"manifest's dump snapshot {restic.short_id(manifest.dump.snapshot_id)}, "
                 f"dump snapshot {restic.short_id(backup.dump.id)}")

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
        log(f"{name}: restoring {result.source}:{manifest.dump.path} into {where}")
        with progress_mod.Progress(f"{name}: restore", total=manifest.dump.bytes, log=log,
                                   interval=inv.settings.progress_interval) as progress:
            outcome = stream_restore(repo, backup.dump.id, manifest.dump.path, scratch_conn,
                                     fmt=manifest.dump_format, timeout=db.timeout_minutes * 60,
                                     on_bytes=progress.add)
        result.check("dump size", outcome.bytes == manifest.dump.bytes,
                     f"{outcome.bytes} bytes streamed, manifest says {manifest.dump.bytes}")
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
        counts = restored_counts(scratch_conn)
        for c in compare_tables(manifest.tables, counts):
            result.checks.append(c)
        for i, sq in enumerate(db.drill.smoke_queries):
            label = f"smoke {sq.name or i + 1}"
            try:
                ok, detail = judge_smoke(sq, postgres.query(scratch_conn, sq.sql, timeout=300))
            except CommandError as exc:
                ok, detail = False, f"query failed: {exc.stderr_tail or exc}"
            result.check(label, ok, f"{sq.sql!r} {detail}")
        _check_globals(inv, db, repo, result, log)
        result.rto_s = time.monotonic() - restore_started
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    finally:
        if created:
            if keep and not result.passed:
                result.kept = where
                result.notes.append(f"scratch database kept for inspection: {where}; drop it "
                                    f"with: {drop_db_sql(scratch)}")
                log(f"{name}: drill failed; kept {where}")
            else:
                try:
                    postgres.query(admin, drop_db_sql(scratch), timeout=300)
                    result.notes.append(f"scratch database {scratch} dropped")
                except LabkeeperError as exc:
                    result.fail(f"could not drop scratch database {where}: {exc}")
    objective_checks(result)


# =====================================================================================
# guest drill
# =====================================================================================


def pick_scratch_vmid(first: int, last: int, used: set[int]) -> int:
    """The lowest VMID of the scratch range used by no guest (cluster or inventory)."""
    for vmid in range(first, last + 1):
        if vmid not in used:
            return vmid
    raise ConfigError(f"no free VMID in drills.guests.scratch_vmids ({first}-{last})")


_NET_KEY = re.compile(r"net\d+")


def isolate_network(config: dict[str, Any], bridge: str | None) -> tuple[dict[str, Any],
                                                                          list[str]]:
    """``(options, delete)`` for a restored guest's config: every NIC moved to the
    isolated ``bridge`` (link kept, firewall on), or deleted when there is none."""
    options: dict[str, Any] = {}
    delete: list[str] = []
    for key, value in sorted(config.items()):
        if not _NET_KEY.fullmatch(key):
            continue
        if bridge is None:
            delete.append(key)
        else:
            parts = [p for p in str(value).split(",") if not p.startswith("bridge=")
                     and not p.startswith("tag=")]
            options[key] = ",".join([*parts, f"bridge={bridge}"])
    return options, delete


def newest_archive(volumes: Sequence[Any], vmid: int) -> Any | None:
    mine = [v for v in volumes if v.vmid == vmid]
    return max(mine, key=lambda v: (v.ctime or 0, v.volid)) if mine else None


# -- scratch guests: marked at creation, swept when a drill died (pure parts) ----------

_MARKER = "labkeeper-drill-scratch"
_MARKER_RE = re.compile(_MARKER + r" created=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


def scratch_description(guest: Guest, volid: str, created: datetime) -> str:
    """The description a scratch copy gets *in the restore call itself* (so even a
    drill that dies during the restore leaves a marked guest); the last line is the
    marker :func:`marker_created` reads."""
    return (f"labkeeper DR drill of {guest.name} ({guest.vmid}) from {volid}: scratch "
            f"copy, safe to destroy.\n"
            f"{_MARKER} created={created.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}")


def marker_created(description: str) -> datetime | None:
    """When labkeeper created this scratch copy, or None when it carries no marker."""
    found = _MARKER_RE.search(description or "")
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def scratch_restore_options(guest: Guest, volid: str, created: datetime) -> dict[str, Any]:
    """Config given with the restore: the marker (tag + description), never started
    on boot, no protection (inherited from the original, it would block the
    cleanup), and only the drill's tag (the original's tags would let tag-selected
    backup jobs or updates pick the copy up)."""
    return {"tags": SCRATCH_TAG, "description": scratch_description(guest, volid, created),
            "onboot": 0, "protection": 0}


def scratch_restore_request(px: Any, gtype: str, node: str, vmid: int, volid: str, *,
                            storage: str, options: dict[str, Any]) -> Any:
    """``POST /nodes/{node}/lxc`` (restore) or ``/qemu`` (archive) with ``options``
    (PVE ≥ 7.2 applies extra parameters of a QEMU restore over the archived config)."""
    if gtype == "lxc":
        return px.restore_lxc_request(node, vmid, volid, storage=storage, unique=True,
                                      start=False, options=options)
    base = px.restore_qemu_request(node, vmid, volid, storage=storage, unique=True,
                                   start=False)
    return px.api_request("POST", base.template, {**base.params, **options}, node=node)


SweepDecision = Literal["destroy", "young", "kept", "unmarked"]


def sweep_decision(description: str, tags: Sequence[str], *, now: datetime,
                   stale_after_s: float) -> tuple[SweepDecision, datetime | None]:
    """What to do with a ``labkeeper-drill``-tagged guest of the scratch range."""
    created = marker_created(description)
    if created is None:
        return "unmarked", None
    if KEPT_TAG in tags:
        return "kept", created
    if (now - created).total_seconds() < stale_after_s:
        return "young", created
    return "destroy", created


# -- SSH / probe checks of the restored copy (pure parts) ----------------------------


def check_label(spec: GuestDrill) -> str:
    if spec.check == "probe" and spec.probe is not None:
        return f"probe {health.probe_name(spec.probe)}"
    return spec.check


def reach_problem(spec: GuestDrill, bridge: str | None) -> str | None:
    """Why an ``ssh`` / ``probe`` check cannot reach the restored copy, or None."""
    if spec.check == "status":
        return None
    probe = spec.probe
    if probe is not None and probe.http is not None:
        needs_address = False
    elif probe is not None and probe.tcp is not None:
        needs_address = probe.tcp.host is None
    else:
        needs_address = True  # ssh, command probe
    if bridge is None:
        return ("the restored copy's network is detached (drills.guests.bridge is not "
                "set), so nothing can reach it: set an isolated bridge the worker can "
                "reach and guests[].drill.address, or use check: status")
    if needs_address and spec.address is None:
        return ("guests[].drill.address is not set: it is the copy's address on the drill "
                "bridge (the guest's own address would reach the original guest, not the "
                "copy)")
    return None


def copy_ssh_target(inv: Inventory, guest: Guest, address: str) -> SshTarget:
    """The SSH target of the restored copy: the guest's ssh settings (merged with the
    defaults) at the drill ``address``."""
    d = inv.ssh
    s = guest.ssh or GuestSsh()
    spec = SshTargetSpec(
        name=f"{guest.name} (drill copy)", kind="guest", address=address,
        port=s.port or d.port, user=s.user or d.user, key=s.key or d.key,
        known_hosts=inv.known_hosts_path(),
        trust_on_first_use=(d.trust_on_first_use if s.trust_on_first_use is None
                            else s.trust_on_first_use),
        host_key=s.host_key, connect_timeout=s.connect_timeout or d.connect_timeout,
        command_timeout=d.command_timeout)
    return SshTarget.from_spec(spec)


def _ssh_attempt(inv: Inventory, guest: Guest, spec: GuestDrill) -> tuple[bool, str, bool]:
    """One SSH login to the copy: (ok, detail, worth retrying)."""
    assert spec.address is not None
    target = copy_ssh_target(inv, guest, spec.address)
    where = f"{target.user}@{target.host}:{target.port}"
    try:
        with connect(target) as client:
            res = client.run(("uname", "-n"), timeout=target.connect_timeout + 20,
                             check=False)
    except LabkeeperError as exc:
        return False, f"SSH login {where} failed: {exc}", exc.transient
    if res.returncode != 0:
        return False, f"SSH login {where} ok but `uname -n` exited {res.returncode}", True
    return True, f"SSH login {where} ok (uname -n: {res.stdout.strip()[:64]})", False


def _probe_attempt(inv: Inventory, guest: Guest, spec: GuestDrill) -> tuple[bool, str, bool]:
    """One run of the drill's probe against the copy: (ok, detail, worth retrying)."""
    probe = spec.probe
    assert probe is not None
    if probe.http is not None:
        ok, detail = health.http_check(probe.http, probe.timeout)
        return ok, detail, True
    if probe.tcp is not None:
        host = probe.tcp.host or spec.address
        assert host is not None
        ok, detail = health.tcp_check(host, probe.tcp.port, probe.timeout)
        return ok, detail, True
    assert probe.command is not None and spec.address is not None
    target = copy_ssh_target(inv, guest, spec.address)
    try:
        with connect(target) as client:
            ok, detail = health.command_check(lambda: client, probe.command, probe.timeout)
    except LabkeeperError as exc:
        return False, f"SSH to {target.host}:{target.port} failed: {exc}", exc.transient
    return ok, f"{detail} on {target.host}:{target.port}", True


def _reach_copy(inv: Inventory, guest: Guest, spec: GuestDrill, result: DrillResult, *,
                deadline: float, poll: float, log: Log) -> None:
    """The ``ssh`` / ``probe`` check, retried until the boot deadline."""
    label = check_label(spec)
    why = reach_problem(spec, inv.drills.guests.bridge)
    if why is not None:
        result.check(label, False, why)
        return
    attempt = _ssh_attempt if spec.check == "ssh" else _probe_attempt
    tries = 0
    while True:
        tries += 1
        ok, detail, again = attempt(inv, guest, spec)
        if ok or not again or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    result.check(label, ok, f"{detail} (attempt {tries})")
    log(f"{guest.name}: {label}: {'ok' if ok else 'FAILED'} — {detail}")


# -- the guest drill ---------------------------------------------------------------------


def guest_drill(inv: Inventory, name: str, *, api: Any = None, log: Log = _nolog,
                now: Callable[[], datetime] | None = None, poll: float = 0.5,
                keep_on_failure: bool | None = None) -> DrillResult:
    """Sweep scratch copies left by dead drills, restore guest ``name``'s latest vzdump
    archive to a scratch VMID, isolated, and prove it comes up (see the module
    docstring)."""
    from labkeeper import proxmox as px

    clock = now or (lambda: datetime.now(tz=UTC))
    started = time.monotonic()
    guest = inv.guest(name)
    spec = guest.drill or GuestDrill()
    settings = inv.drills.guests
    keep = settings.keep_on_failure if keep_on_failure is None else keep_on_failure
    result = DrillResult("guest", guest.name, rpo_objective_s=spec.rpo_hours * 3600,
                         rto_objective_s=spec.rto_minutes * 60)
    try:
        api = api if api is not None else px.connect_lab(inv.proxmox)
        sweep_scratch(px, api, inv, result, now=clock(), poll=poll, log=log)
        _guest_drill(px, api, inv, guest, spec, result, keep=keep, log=log, clock=clock,
                     poll=poll)
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    result.duration_s = time.monotonic() - started
    log(f"guest drill {name}: {result.status.upper()} — {result.summary()}")
    return result


def sweep_scratch(px: Any, api: Any, inv: Inventory, result: DrillResult, *, now: datetime,
                  poll: float, log: Log) -> list[int]:
    """Destroy the scratch copies dead drills left behind: guests of the scratch range
    (never an inventory guest) tagged ``labkeeper-drill`` *and* carrying labkeeper's
    description marker, older than ``stale_scratch_hours``, not kept on purpose.
    Returns the VMIDs destroyed; reports everything it saw."""
    settings = inv.drills.guests
    rng = settings.scratch_vmids
    mine = {g.vmid for g in inv.guests}
    destroyed: list[int] = []
    failed: list[str] = []
    for g in px.list_guests(api):
        if g.vmid not in rng or g.vmid in mine or SCRATCH_TAG not in g.tags:
            continue
        config = px.guest_config(api, g.node, g.vmid, g.type)
        decision, created = sweep_decision(str(config.values.get("description", "")),
                                           [*g.tags, *config.tags], now=now,
                                           stale_after_s=settings.stale_scratch_hours * 3600)
        when = created.isoformat(timespec="seconds") if created else ""
        if decision == "unmarked":
            result.notes.append(f"VMID {g.vmid} is tagged {SCRATCH_TAG} but has no labkeeper "
                                "marker in its description: left alone")
        elif decision == "kept":
            result.notes.append(f"scratch copy VMID {g.vmid} on {g.node} was kept from a "
                                f"failed drill ({when}): destroy it when you are done")
        elif decision == "young":
            result.notes.append(f"scratch copy VMID {g.vmid} on {g.node} was created {when}, "
                                "maybe by a drill still running: left alone")
        else:
            try:
                _destroy_guest(px, api, g.node, g.vmid, g.type, running=g.status == "running",
                               poll=poll)
            except LabkeeperError as exc:
                failed.append(f"VMID {g.vmid} on {g.node}: {exc}")
                continue
            destroyed.append(g.vmid)
            log(f"destroyed scratch copy VMID {g.vmid} on {g.node} left by a drill that "
                f"died ({when})")
    if destroyed or failed:
        detail = "; ".join(
            ([f"destroyed VMID {', '.join(map(str, destroyed))} (left by drills that died)"]
             if destroyed else [])
            + [f"could not destroy {f}" for f in failed])
        result.check("leftover scratch guests", not failed, detail)
    return destroyed


def _destroy_guest(px: Any, api: Any, node: str, vmid: int, gtype: str, *, running: bool,
                   poll: float) -> None:
    if running:
        px.wait_for_task(api, px.stop_guest(api, node, vmid, gtype), timeout=300,
                         max_poll=poll)
    px.wait_for_task(api, px.destroy_guest(api, node, vmid, gtype, purge=True), timeout=600,
                     max_poll=poll)


def _guest_drill(px: Any, api: Any, inv: Inventory, guest: Guest, spec: GuestDrill,
                 result: DrillResult, *, keep: bool, log: Log, clock: Callable[[], datetime],
                 poll: float) -> None:
    settings = inv.drills.guests
    assert inv.proxmox is not None
    where = px.find_guest(api, guest.vmid)
    node = where.node if where is not None else guest.node
    volumes = []
    for storage in inv.proxmox.storages:
        if "backup" in storage.content:
            volumes += px.backups(api, node, storage.name, vmid=guest.vmid)
    archive = newest_archive(volumes, guest.vmid)
    if archive is None:
        result.fail(f"no vzdump archive of guest {guest.name} ({guest.vmid}) on node {node}")
        return
    result.source = archive.volid
    if archive.ctime:
        result.rpo_s = max(0.0, clock().timestamp() - archive.ctime)
    result.check("archive", True, f"{archive.volid} ({archive.size} bytes)")
    used = {g.vmid for g in px.list_guests(api)} | {g.vmid for g in inv.guests}
    rng = settings.scratch_vmids
    vmid = pick_scratch_vmid(rng.first, rng.last, used)
    px.next_vmid(api, vmid)  # PVE confirms it is free (400 if not)
    target_node = settings.node or guest.node
    storage = settings.storage or guest.resources.storage
    gtype = guest.type
    log(f"{guest.name}: restoring {archive.volid} to scratch VMID {vmid} on {target_node} "
        f"({storage})")
    restore_started = time.monotonic()
    created = False
    try:
        req = scratch_restore_request(
            px, gtype, target_node, vmid, archive.volid, storage=storage,
            options=scratch_restore_options(guest, archive.volid, clock()))
        upid = px.send(api, req)
        created = True
        task_timeout = max(settings.boot_timeout, spec.rto_minutes * 60 * 4)
        px.wait_for_task(api, upid, timeout=task_timeout, max_poll=poll)
        result.scratch = f"VMID {vmid} on {target_node}"
        result.check("restore", True, f"{archive.volid} → VMID {vmid}")
        config = px.guest_config(api, target_node, vmid, gtype)
        options, delete = isolate_network(config.values, settings.bridge)
        host_bound = px.host_bound_keys(config.values)
        if options or delete or host_bound:
            px.configure(api, target_node, vmid, gtype, options, delete=[*delete, *host_bound])
        isolation = (f"NICs on isolated bridge {settings.bridge}" if settings.bridge
                     else f"{len(delete)} NIC(s) detached" if delete else "no NIC")
        result.check("network isolated", True, isolation)
        result.check("host mounts/devices removed", True,
                     ", ".join(host_bound) if host_bound else "none in the archive")
        up = px.start_guest(api, target_node, vmid, gtype)
        px.wait_for_task(api, up, timeout=settings.boot_timeout, max_poll=poll)
        deadline = time.monotonic() + settings.boot_timeout
        status = px.guest_status(api, target_node, vmid, gtype)
        while status.status != "running" and time.monotonic() < deadline:
            time.sleep(poll)
            status = px.guest_status(api, target_node, vmid, gtype)
        running = result.check("running", status.status == "running",
                               f"status {status.status}" + (f", qmp {status.qmpstatus}"
                                                            if status.qmpstatus else ""))
        if spec.check != "status":
            if running:
                _reach_copy(inv, guest, spec, result, deadline=deadline, poll=poll, log=log)
            else:
                result.check(check_label(spec), False, "not tried: the copy is not running")
        result.rto_s = time.monotonic() - restore_started
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    finally:
        if created:
            if keep and not result.passed:
                result.kept = f"VMID {vmid} on {target_node}"
                result.notes.append(f"scratch guest kept for inspection: VMID {vmid} on "
                                    f"{target_node}")
                try:  # never swept: the next drills report it instead
                    px.configure(api, target_node, vmid, gtype,
                                 {"tags": [SCRATCH_TAG, KEPT_TAG]})
                except LabkeeperError as exc:
                    result.notes.append(f"could not tag VMID {vmid} {KEPT_TAG} ({exc}): the "
                                        "next guest drill may destroy it once it is stale")
            else:
                _destroy_scratch(px, api, inv, vmid, result, poll=poll)
    objective_checks(result)


def _destroy_scratch(px: Any, api: Any, inv: Inventory, vmid: int, result: DrillResult, *,
                     poll: float) -> None:
    rng = inv.drills.guests.scratch_vmids
    if vmid not in rng or vmid in {g.vmid for g in inv.guests}:
        raise AssertionError(f"refusing to destroy VMID {vmid}: not a scratch VMID")
    try:
        found = px.find_guest(api, vmid)
        if found is None:
            result.notes.append(f"scratch VMID {vmid} does not exist (restore cleaned up)")
            return
        _destroy_guest(px, api, found.node, vmid, found.type,
                       running=found.status == "running", poll=poll)
        result.notes.append(f"scratch guest {vmid} destroyed")
    except LabkeeperError as exc:
        result.fail(f"could not destroy scratch guest {vmid}: {exc}")


# =====================================================================================
# repository drill
# =====================================================================================


def next_subset(previous: int | None, period: int) -> int:
    """The part ``n`` (1..period) of ``--read-data-subset n/period`` after ``previous``."""
    if period < 1:
        raise ValueError("period must be ≥ 1")
    if previous is None or not 1 <= previous <= period:
        return 1
    return previous % period + 1


def _state_file(inv: Inventory, repo_name: str) -> Path:
    return inv.settings.state_dir / "drills" / f"repository-{repo_name}.json"


def read_subset_state(inv: Inventory, repo_name: str) -> int | None:
    try:
        data = json.loads(_state_file(inv, repo_name).read_text())
        return int(data["last_subset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_subset_state(inv: Inventory, repo_name: str, subset: int, period: int) -> None:
    path = _state_file(inv, repo_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"last_subset": subset, "period": period,
                               "at": datetime.now(tz=UTC).isoformat()}))
    os.replace(tmp, path)


def dump_sha256(repo: restic.Repo, snapshot_id: str, path: str, *,
                timeout: float = 3600) -> tuple[str, int]:
    """sha256 and length of one file as ``restic dump`` streams it."""
    res = process.pipeline(
        [process.Stage(restic.dump_argv(repo, snapshot_id, path), codes=restic.EXIT_CODES,
                       env=repo.env()),
         process.Stage(sha256_argv())],
        timeout=timeout, stall_timeout=STALL_TIMEOUT, check=False)
    if not res.ok:
        idx = res.cause if res.cause is not None else 0
        err = process.make_error(res.stages[idx])
        if idx == 0:
            err = restic.classify_failure(err)
        raise LabkeeperError(f"restic dump {snapshot_id[:8]}:{path}: {err}",
                             transient=err.transient)
    return res.stdout.split()[0], res.bytes_relayed[0]


def restore_sha256(repo: restic.Repo, snapshot_id: str, path: str, workdir: Path, *,
                   timeout: float = 3600) -> tuple[str, int]:
    """sha256 and length of one file restored by ``restic restore --verify``."""
    target = Path(tempfile.mkdtemp(prefix="restore-", dir=workdir))
    try:
        try:
            restic.run_restic(repo, restore_argv(repo, snapshot_id, str(target), path),
                              timeout=timeout)
        except CommandError as exc:
            raise LabkeeperError(f"restic restore {snapshot_id[:8]}:{path}: {exc}",
                                 transient=exc.transient) from None
        restored = target / path.lstrip("/")
        h = hashlib.sha256()
        n = 0
        with open(restored, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n
    finally:
        shutil.rmtree(target, ignore_errors=True)


def repository_drill(inv: Inventory, name: str, *, log: Log = _nolog,
                     choose: Callable[[Sequence[Any]], Any] | None = None,
                     max_files: int = 5) -> DrillResult:
    """Read a rotating subset of repository ``name``'s packs and restore one random
    snapshot byte for byte (see the module docstring)."""
    started = time.monotonic()
    settings = inv.drills.repository
    result = DrillResult("repository", name)
    chooser = choose or (lambda seq: seq[pysecrets.randbelow(len(seq))])
    try:
        inv.repository(name)
        repo = pg_backup.open_repo(inv, name)
        period = settings.read_data_period
        part = next_subset(read_subset_state(inv, name), period)
        subset = f"{part}/{period}"
        log(f"repository {name}: restic check --read-data-subset={subset}")
        try:
            restic.check(repo, read_data_subset=subset, timeout=6 * 3600)
            result.check(f"check {subset}", True, "packs read and verified, no error")
            write_subset_state(inv, name, part, period)
        except CommandError as exc:
            tail = " | ".join((exc.stderr_tail or str(exc)).splitlines()[-4:])
            result.check(f"check {subset}", False, f"restic check found errors: {tail}")
            result.transient = result.transient or exc.transient
        if settings.restore_random_snapshot:
            _random_restore(inv, repo, result, chooser, max_files=max_files, log=log)
        result.rto_s = time.monotonic() - started
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    result.duration_s = time.monotonic() - started
    log(f"repository drill {name}: {result.status.upper()} — {result.summary()}")
    return result


def _random_restore(inv: Inventory, repo: restic.Repo, result: DrillResult,
                    chooser: Callable[[Sequence[Any]], Any], *, max_files: int,
                    log: Log) -> None:
    snaps = restic.snapshots(repo)
    if not snaps:
        result.notes.append("the repository has no snapshot to restore")
        return
    snap = chooser(snaps)
    sid = snap.short_id or snap.id[:8]
    result.source = f"{sid} ({', '.join(snap.paths)})"
    files = [n for n in restic.ls(repo, snap.id) if n.type == "file"]
    if len(files) > max_files:
        picked: list[restic.LsNode] = []
        pool = list(files)
        while len(picked) < max_files:
            one = chooser(pool)
            pool.remove(one)
            picked.append(one)
        result.notes.append(f"{max_files} of {len(files)} files of {sid} compared")
        files = picked
    workdir = inv.settings.state_dir / "drills" / "restore"
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for node in files:
        digest, size = dump_sha256(repo, snap.id, node.path)
        ok = node.size is None or size == node.size
        detail = f"dump {size} bytes sha256 {digest[:16]}…"
        if not ok:
            detail = f"dump gave {size} bytes, restic recorded {node.size}"
        else:
            digest2, size2 = restore_sha256(repo, snap.id, node.path, workdir)
            if (digest2, size2) != (digest, size):
                ok = False
                detail = (f"restore --verify gave {size2} bytes sha256 {digest2[:16]}…, dump "
                          f"gave {size} bytes sha256 {digest[:16]}…")
            else:
                detail += ", identical through restic restore --verify"
        result.check(f"file {sid}:{node.path}", ok, detail)
        log(f"{sid}:{node.path}: {detail}")


# =====================================================================================
# which drills a target means (pure)
# =====================================================================================

KINDS = ("database", "guest", "repository", "paths", "pitr")
_ALIASES = {"db": "database", "database": "database", "guest": "guest", "vm": "guest",
            "ct": "guest", "repo": "repository", "repository": "repository",
            "paths": "paths", "path": "paths", "pitr": "pitr"}


def path_set_target(pb: PathBackup) -> str:
    """The drill target of a path set: ``<host>/<set>`` (label ``paths:<host>/<set>``,
    the series tag of its snapshots)."""
    return f"{pb.host}/{pb.name}"


def find_path_set(inv: Inventory, target: str) -> PathBackup:
    """``<host>/<set>`` or ``<set>`` → the path set."""
    host, slash, name = target.rpartition("/")
    if not slash:
        return inv.path_backup(target)
    pb = inv.path_backup(name)
    if pb.host != host:
        raise ConfigError(f"path set {name!r} is on host {pb.host!r}, not {host!r} "
                          f"(target paths:{path_set_target(pb)})")
    return pb


def plan_targets(inv: Inventory, target: str | None = "all") -> list[tuple[str, str]]:
    """``(kind, name)`` of the drills a target asks for.

    ``all`` (or nothing): every enabled database drill, every present guest with an
    enabled ``drill``, (when ``drills.repository.enabled``) each repository of
    ``drills.repository.repositories`` (default: all), (when
    ``drills.paths.enabled``) each path set of ``drills.paths.path_sets`` (default:
    all), and every server of the ``pitr:`` section (the point-in-time drill,
    :func:`labkeeper.pitr.drill.dr_drill`). ``db:NAME``, ``guest:NAME``,
    ``repository:NAME`` (or ``repository`` for all), ``paths:HOST/SET`` or
    ``paths:SET`` (or ``paths`` for all), ``pitr:NAME`` (or ``pitr`` for all): that
    drill, enabled or not (a manual run). A bare ``NAME`` is looked up among databases,
    guests, repositories, path sets and PITR servers. Path sets are named ``HOST/SET``.
    """
    text = (target or "all").strip()
    if text == "all":
        return _plan_all(inv)
    kind, colon, name = text.partition(":")
    if colon:
        return [_plan_kind(inv, kind, name, text)]
    groups = {"repository": _all_repositories, "repositories": _all_repositories,
              "repo": _all_repositories, "paths": _all_path_sets, "path": _all_path_sets,
              "pitr": _all_pitr}
    if text in groups:
        return groups[text](inv)
    return _plan_bare(inv, text)


def _plan_all(inv: Inventory) -> list[tuple[str, str]]:
    out = [("database", d.name) for d in inv.databases if d.drill.enabled]
    out += [("guest", g.name) for g in inv.guests
            if g.drill is not None and g.drill.enabled and g.state == "present"]
    if inv.drills.repository.enabled:
        out += _all_repositories(inv)
    if inv.drills.paths.enabled:
        out += _all_path_sets(inv)
    return out + _all_pitr(inv)


def _plan_kind(inv: Inventory, kind: str, name: str, text: str) -> tuple[str, str]:
    if kind not in _ALIASES:
        raise ConfigError(f"unknown drill kind {kind!r} in target {text!r} "
                          "(use db:, guest:, repository:, paths: or pitr:)")
    kind = _ALIASES[kind]
    if kind == "database":
        inv.database(name)
    elif kind == "guest":
        name = inv.guest(name).name
    elif kind == "paths":
        name = path_set_target(find_path_set(inv, name))
    elif kind == "pitr":
        name = pitr_server(inv, name).name
    else:
        inv.repository(name)
    return kind, name


def _plan_bare(inv: Inventory, text: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if any(d.name == text for d in inv.databases):
        found.append(("database", text))
    if any(g.name == text or str(g.vmid) == text for g in inv.guests):
        found.append(("guest", inv.guest(text).name))
    if any(r.name == text for r in inv.repositories):
        found.append(("repository", text))
    if any(pb.name == text or path_set_target(pb) == text for pb in inv.path_backups):
        found.append(("paths", path_set_target(find_path_set(inv, text))))
    if any(s.name == text for s in inv.pitr):
        found.append(("pitr", text))
    if not found:
        known = ([f"db:{d.name}" for d in inv.databases] + [f"guest:{g.name}" for g in inv.guests]
                 + [f"repository:{r.name}" for r in inv.repositories]
                 + [f"paths:{path_set_target(pb)}" for pb in inv.path_backups]
                 + [f"pitr:{s.name}" for s in inv.pitr])
        raise ConfigError(f"no database, guest, repository or path set called {text!r}, nor "
                          f"a PITR server (known: {', '.join(known) or 'none'}, or all)")
    if len(found) > 1:
        raise ConfigError(f"{text!r} names several things ({', '.join(k for k, _ in found)}): "
                          f"say which, e.g. {found[0][0]}:{text}")
    return found


def _all_repositories(inv: Inventory) -> list[tuple[str, str]]:
    repos = inv.drills.repository.repositories or [r.name for r in inv.repositories]
    return [("repository", r) for r in repos]


def _all_pitr(inv: Inventory) -> list[tuple[str, str]]:
    return [("pitr", s.name) for s in inv.pitr]


def _all_path_sets(inv: Inventory) -> list[tuple[str, str]]:
    names = inv.drills.paths.path_sets or [pb.name for pb in inv.path_backups]
    return [("paths", path_set_target(inv.path_backup(n))) for n in names]
