"""PostgreSQL client tools (psql, pg_dump, pg_restore) through the process runner.

The password reaches the tools through ``PGPASSWORD`` in their environment,
never argv; connection parameters other than the password go in argv as
separate arguments.
"""

from __future__ import annotations

import csv
import functools
import io
import os
import re
import shutil
import time
from dataclasses import dataclass

from pydantic import SecretStr

from labkeeper import process
from labkeeper.errors import CommandError, CommandTimeout
from labkeeper.process import ExitCode, ExitCodeTable

PSQL_CODES = ExitCodeTable("psql", {
    0: ExitCode("success", "ok"),
    1: ExitCode("fatal error (e.g. out of memory, file not found)", "permanent"),
    # 2 covers both a refused/lost connection (transient) and a refused login
    # (permanent): _classify tells them apart from stderr.
    2: ExitCode("connection to the server failed", "permanent"),
    3: ExitCode("error in a script (ON_ERROR_STOP)", "permanent"),
})
PG_DUMP_CODES = ExitCodeTable("pg_dump", {0: ExitCode("success", "ok"),
                                          1: ExitCode("dump failed", "permanent")})


def remote_codes(table: ExitCodeTable, where: str) -> ExitCodeTable:
    """``table`` for a tool run through ``docker exec`` (and the SSH bridge): the codes
    docker and the bridge add, each naming where the tool ran (pure)."""
    tool = f"{table.tool} in {where}"
    extra = {
        125: ExitCode(f"docker could not run {tool} (is the container running?)",
                      "permanent"),
        126: ExitCode(f"{tool} could not be started", "permanent"),
        127: ExitCode(f"{table.tool} not found in {where}", "permanent"),
        137: ExitCode(f"{tool} was killed (SIGKILL: killed, or its container stopped)",
                      "permanent"),
        143: ExitCode(f"{tool} was terminated (SIGTERM)", "permanent"),
        255: ExitCode(f"{tool}: the SSH connection was lost or the remote command was "
                      "killed", "transient"),
    }
    return ExitCodeTable(tool, {**extra, **table.codes})


def codes_for(conn: Conn, table: ExitCodeTable) -> ExitCodeTable:
    """The exit code table of a tool run for ``conn`` (where its client runs)."""
    return remote_codes(table, conn.client.where) if conn.client.prefix else table

_TRANSIENT_STDERR = ("could not connect", "Connection refused", "server closed the connection",
                     "timeout expired", "the database system is starting up",
                     "the database system is shutting down", "too many clients")


PG_ENV_NAMES = ("PGPASSWORD", "PGSSLMODE", "PGCONNECT_TIMEOUT", "PGAPPNAME")
"""Every variable :meth:`Conn.env` may set: what a client running elsewhere (in a
container, on another host) must be handed by name (``docker exec -e NAME``)."""


@dataclass(frozen=True)
class Client:
    """Where and which PostgreSQL client tools run for a connection.

    ``bindir``: the tools come from this directory (``/usr/lib/postgresql/17/bin``);
    None: from PATH. ``prefix``: an argv the tool's argv is appended to, to run it
    elsewhere (``docker exec ... CONTAINER``, the SSH bridge); it holds names only,
    never values. ``env``: extra variables for the local process (no secrets: the
    password stays in :meth:`Conn.env`). ``server_major``: the server's major
    version when it was detected."""

    bindir: str | None = None
    prefix: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    server_major: int | None = None
    where: str = ""
    """How a person would name where the tools run (for messages)."""

    def tool(self, name: str) -> str:
        return name if self.bindir is None else f"{self.bindir}/{name}"

    def argv(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        return (*self.prefix, self.tool(argv[0]), *argv[1:])


LOCAL_CLIENT = Client()


@dataclass(frozen=True)
class Conn:
    host: str
    port: int
    dbname: str
    user: str
    password: SecretStr | None = None
    sslmode: str = "prefer"
    connect_timeout: int = 10
    client: Client = LOCAL_CLIENT
    sslrootcert: str | None = None
    """CA file that verify-ca / verify-full check the server's certificate against."""

    def env(self) -> dict[str, str]:
        env = {"PGSSLMODE": self.sslmode, "PGCONNECT_TIMEOUT": str(self.connect_timeout),
               "PGAPPNAME": "labkeeper", **dict(self.client.env)}
        if self.sslrootcert is not None:
            env["PGSSLROOTCERT"] = self.sslrootcert
        if self.password is not None:
            env["PGPASSWORD"] = self.password.get_secret_value()
        return env

    def conn_args(self) -> tuple[str, ...]:
        return ("-h", self.host, "-p", str(self.port), "-U", self.user, "-d", self.dbname)

    def argv(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        """A client tool's argv, run where and as this connection's client says."""
        return self.client.argv(argv)

    @property
    def address(self) -> str:
        return f"{self.client.where + ': ' if self.client.where else ''}{self.host}:{self.port}"


def psql_argv(conn: Conn) -> tuple[str, ...]:
    """psql reading SQL from stdin, CSV out, stopping at the first error."""
    return conn.argv(("psql", "-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", *conn.conn_args(),
                      "-f", "-"))


def parse_csv(stdout: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(stdout)))
    return rows[1:] if rows else []  # drop the header


def name_server(message: str, conn: Conn) -> str:
    """``psql failed on localhost (...)`` -> ``psql failed for 127.0.0.1:5432/appdb
    (...)``: an error names the server address actually used, not only where the
    client ran; a message without that phrase gets the address appended."""
    where = f"{conn.address}/{conn.dbname}"
    if " failed on localhost " in message:
        return message.replace(" failed on localhost ", f" failed for {where} ", 1)
    return message if where in message else f"{message} ({where})"


def _classify(err: CommandError, conn: Conn | None = None) -> CommandError:
    if not err.transient and any(s in err.stderr_tail for s in _TRANSIENT_STDERR):
        err.transient = True
    if conn is not None:
        err.message = name_server(err.message, conn)
        err.args = (err.message,)
    return err


def query(conn: Conn, sql: str, *, timeout: float = 60) -> list[list[str]]:
    """Run SQL (one statement whose result matters, last) and return its rows as text."""
    try:
        res = process.run(psql_argv(conn), timeout=timeout, codes=codes_for(conn, PSQL_CODES),
                          env=conn.env(), input=sql)
    except CommandError as exc:
        raise _classify(exc, conn) from None
    return parse_csv(res.stdout)


@dataclass(frozen=True)
class ServerInfo:
    version: str
    database_size: int


def server_info(conn: Conn, *, timeout: float = 30) -> ServerInfo:
    rows = query(conn, "SELECT current_setting('server_version'), "
                       "pg_database_size(current_database());", timeout=timeout)
    if not rows or len(rows[0]) != 2:
        raise CommandError("unexpected psql output for server info", argv=psql_argv(conn),
                           returncode=0)
    return ServerInfo(version=rows[0][0], database_size=int(rows[0][1]))


# =====================================================================================
# Dumps and consistent manifests (issue 4)
# =====================================================================================

DUMP_COMPLETE = b"-- PostgreSQL database dump complete"
CLUSTER_DUMP_COMPLETE = b"-- PostgreSQL database cluster dump complete"
CUSTOM_MAGIC = b"PGDMP"
PG_DUMPALL_CODES = ExitCodeTable("pg_dumpall", {0: ExitCode("success", "ok"),
                                                1: ExitCode("dump failed", "permanent")})


def quote_ident(name: str) -> str:
    """SQL identifier quoting (``"a""b"``), for names read from the catalog."""
    if "\x00" in name:
        raise ValueError("identifier contains a NUL byte")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    if "\x00" in value:
        raise ValueError("literal contains a NUL byte")
    return "'" + value.replace("'", "''") + "'"


def pg_dump_argv(conn: Conn, *, fmt: str = "plain", snapshot: str | None = None,
                 lock_wait_timeout_ms: int = 120_000) -> tuple[str, ...]:
    """pg_dump to stdout; ``snapshot`` is an exported snapshot id (``--snapshot``)."""
    flag = {"plain": "-Fp", "custom": "-Fc"}[fmt]
    argv: tuple[str, ...] = ("pg_dump", "--no-password", flag)
    if fmt == "custom":
        argv += ("-Z", "0")  # pre-compression defeats restic's deduplication
    if snapshot:
        if not re.fullmatch(r"[0-9A-F]{8}-[0-9A-F]{8}-[0-9]+", snapshot):
            raise ValueError(f"not an exported snapshot id: {snapshot!r}")
        argv += (f"--snapshot={snapshot}",)
    argv += (f"--lock-wait-timeout={lock_wait_timeout_ms}", *conn.conn_args())
    return conn.argv(argv)


def pg_dumpall_globals_argv(conn: Conn, *, role_passwords: bool = True) -> tuple[str, ...]:
    """``pg_dumpall --globals-only`` (roles, tablespaces); ``conn.dbname`` is the
    database it connects to (``-l``)."""
    argv: tuple[str, ...] = ("pg_dumpall", "--no-password", "--globals-only")
    if not role_passwords:
        argv += ("--no-role-passwords",)
    return conn.argv((*argv, "-h", conn.host, "-p", str(conn.port), "-U", conn.user,
                      "-l", conn.dbname))


def _trailer_ok(tail: bytes, marker: bytes) -> str | None:
    idx = tail.rfind(marker)
    if idx < 0:
        return f"the final '{marker.decode()}' line is missing"
    for line in tail[idx + len(marker):].split(b"\n"):
        line = line.strip()
        if line and line != b"--" and not line.startswith(b"\\unrestrict "):
            return f"unexpected output after '{marker.decode()}'"
    return None


def plain_dump_complete(tail: bytes, nbytes: int) -> str | None:
    """Gate for a plain-format pg_dump: None when the stream ends with pg_dump's
    ``-- PostgreSQL database dump complete`` trailer (then only ``--``, blank and
    ``\\unrestrict`` lines), else why it is incomplete."""
    if nbytes == 0:
        return "the dump is empty"
    return _trailer_ok(tail, DUMP_COMPLETE)


def globals_dump_complete(tail: bytes, nbytes: int) -> str | None:
    if nbytes == 0:
        return "the dump is empty"
    return _trailer_ok(tail, CLUSTER_DUMP_COMPLETE)


def custom_dump_complete(tail: bytes, nbytes: int) -> str | None:
    """A custom-format archive written to a pipe has no trailer; only the exit code
    proves it. (A truncated -Fc archive still passes ``pg_restore -l``.)"""
    return None if nbytes > len(CUSTOM_MAGIC) else "the archive is empty"


def dump_tool_version(session: PsqlSession) -> str:
    """The version of the pg_dump that dumps ``session``'s database: psql's own in
    the server's container (same package, no extra exec), else ``pg_dump --version``."""
    if session.conn.client.prefix:
        return session.client_version()
    return pg_dump_version(session.conn)


def pg_dump_version(conn: Conn | None = None, *, timeout: float = 15) -> str:
    """The version of the pg_dump ``conn``'s client runs (default: the one on PATH).
    One run here per binary file (cached by path, inode and mtime: an upgraded
    pg_dump is read again); a client run elsewhere (``prefix``) is asked each time."""
    argv = conn.argv(("pg_dump", "--version")) if conn else ("pg_dump", "--version")
    env = tuple(conn.client.env) if conn else ()
    remote = bool(conn and conn.client.prefix)
    path = None if remote else shutil.which(argv[0], path=dict(env).get("PATH"))
    if path is None:
        return _dump_version(argv, env, timeout)
    st = os.stat(path)
    return _local_dump_version(path, env, st.st_ino, st.st_mtime_ns, timeout)


@functools.lru_cache(maxsize=16)
def _local_dump_version(path: str, env: tuple[tuple[str, str], ...], _ino: int,
                        _mtime_ns: int, timeout: float) -> str:
    return _dump_version((path, "--version"), env, timeout)


def _dump_version(argv: tuple[str, ...], env: tuple[tuple[str, str], ...],
                  timeout: float) -> str:
    res = process.run(argv, timeout=timeout, env=dict(env) if env else None)
    m = re.search(r"(\d+(?:\.\d+)+)", res.stdout)
    return m.group(1) if m else res.stdout.strip()


# -- a psql coprocess: one session kept open while pg_dump runs ------------------------

_MARKER_PREFIX = "__labkeeper_end_"


class PsqlSession:
    """One ``psql`` process kept open (stdin/stdout pipes) so a transaction can stay
    open across several queries and while ``pg_dump --snapshot`` runs.

    Each :meth:`query` sends SQL followed by ``\\echo <marker>`` and reads CSV rows
    up to the marker line. psql runs with ``ON_ERROR_STOP``: an SQL error ends the
    process, and the error (from stderr) is raised as :class:`CommandError`.
    The password travels in ``PGPASSWORD`` only.
    """

    def __init__(self, conn: Conn, *, timeout: float = 300) -> None:
        import secrets as pysecrets

        self.conn = conn
        self.timeout = timeout
        self.marker = _MARKER_PREFIX + pysecrets.token_hex(8)
        self.argv = conn.argv(("psql", "-X", "-q", "-t", "--csv", "-v", "ON_ERROR_STOP=1",
                               "--no-password", *conn.conn_args()))
        self.proc: process.Coprocess | None = None

    def __enter__(self) -> PsqlSession:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        self.proc = process.Coprocess(self.argv, env=self.conn.env())

    def query(self, sql: str, *, timeout: float | None = None) -> list[list[str]]:
        """Run SQL; the rows of the last statement that returns rows (CSV, as text)."""
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError("psql session is not started")
        text = sql.rstrip()
        if not text.endswith(";"):
            text += ";"
        payload = f"{text}\n\\echo {self.marker}\n".encode()
        try:
            proc.stdin.write(payload)
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failure() from None
        lines = self._read_until_marker(timeout or self.timeout)
        return list(csv.reader(io.StringIO("".join(lines))))

    def client_version(self, *, timeout: float | None = None) -> str:
        """This psql's own version (``VERSION_NAME``): for tools run in a server's
        container it stands for pg_dump's, from the same client package, without
        starting one more ``docker exec`` (over SSH: one more connection)."""
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise RuntimeError("psql session is not started")
        try:
            proc.stdin.write(f"\\echo :VERSION_NAME\n\\echo {self.marker}\n".encode())
            proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._failure() from None
        lines = self._read_until_marker(timeout or self.timeout)
        return lines[-1].strip() if lines else ""

    def _read_until_marker(self, timeout: float) -> list[str]:
        import select

        proc = self.proc
        assert proc is not None and proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        buf = b""
        out: list[str] = []
        marker = self.marker.encode() + b"\n"
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if line + b"\n" == marker:
                    return out
                out.append(line.decode("utf-8", "replace") + "\n")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close(kill=True)
                raise CommandTimeout(f"psql query timed out after {timeout:g}s",
                                     argv=self.argv, timeout=timeout)
            ready, _, _ = select.select([fd], [], [], min(remaining, 1.0))
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._failure()
            buf += chunk

    def _failure(self) -> CommandError:
        proc = self.proc
        assert proc is not None
        if proc.wait(timeout=10) is None:
            proc.kill()
        res = proc.result(codes_for(self.conn, PSQL_CODES))
        proc.close(kill=True)  # already ended: closes its pipes
        rc = res.returncode
        err = process.make_error(res) if rc != 0 else CommandError(
            "psql ended the session unexpectedly", argv=self.argv, returncode=rc,
            stderr_tail=res.stderr_tail())
        self.proc = None
        return _classify(err, self.conn)

    def close(self, *, kill: bool = False) -> None:
        proc = self.proc
        self.proc = None
        if proc is None:
            return
        # Closing stdin ends the session (an open transaction rolls back).
        proc.close(timeout=10, kill=kill)


TABLES_SQL = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_depend d
                  WHERE d.classid = 'pg_catalog.pg_class'::regclass AND d.objid = c.oid
                    AND d.deptype = 'e')
ORDER BY 1, 2
"""


def row_counts_sql(tables: list[tuple[str, str]]) -> str:
    """One statement counting every table exactly: ``schema, name, count`` rows."""
    parts = [
        f"SELECT {quote_literal(s)}, {quote_literal(t)}, count(*) "  # noqa: S608 - quoted
        f"FROM {quote_ident(s)}.{quote_ident(t)}"
        for s, t in tables
    ]
    return "\nUNION ALL\n".join(parts)


@dataclass(frozen=True)
class SnapshotFacts:
    """What one exported snapshot contains, read inside that very transaction."""

    snapshot_id: str
    server_version: str
    database_size: int
    tables: tuple[tuple[str, str, int], ...]
    wal_lsn: str = ""
    """The WAL insert position read right after the snapshot was taken (see
    :data:`SNAPSHOT_LSN_SQL`); empty on a standby."""


@dataclass(frozen=True)
class OpenSnapshot:
    """An exported snapshot of a transaction still open in a :class:`PsqlSession`."""

    snapshot_id: str
    server_version: str
    database_size: int
    wal_lsn: str = ""


SNAPSHOT_LSN_SQL = ("CASE WHEN pg_catalog.pg_is_in_recovery() THEN '' "
                    "ELSE pg_catalog.pg_current_wal_insert_lsn()::text END")
"""The WAL position a snapshot corresponds to, read in the statement that takes the
snapshot (a REPEATABLE READ transaction's snapshot is taken when its first statement
starts): every commit the snapshot sees was inserted into the WAL before it. The
*insert* position, not ``pg_current_wal_lsn()`` (the write position): with
``synchronous_commit = off`` a visible commit may not be written yet. A commit that
lands between the snapshot and this read is in the WAL before the LSN but not in the
snapshot: a point-in-time restore to the LSN can differ from the dump by exactly those
(the PITR drill says so). Empty on a standby (no insert position)."""


def open_snapshot(session: PsqlSession) -> OpenSnapshot:
    """Open a REPEATABLE READ, READ ONLY transaction and export its snapshot (for
    ``pg_dump --snapshot``) with the WAL position it corresponds to; the transaction
    stays open. One round trip."""
    rows = session.query("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY;\n"
                         "SELECT pg_catalog.pg_export_snapshot(), "
                         "current_setting('server_version'), "
                         "pg_catalog.pg_database_size(current_database()), "
                         f"{SNAPSHOT_LSN_SQL}")
    snapshot_id, version, size, lsn = rows[-1]
    return OpenSnapshot(snapshot_id=snapshot_id, server_version=version,
                        database_size=int(size), wal_lsn=lsn)


def count_rows(session: PsqlSession) -> tuple[tuple[str, str, int], ...]:
    """Every table with its exact row count, read in the session's open transaction
    (so in the exported snapshot; ``pg_dump --snapshot`` may run meanwhile).

    Without parallel workers: the counts run alongside the dump, which takes longer
    anyway, so workers would only add CPU the dump competes for (measured: a
    3-million-row count cost the server 0.39-0.48 s of CPU with the default two
    workers, 0.15-0.34 s without). Without JIT: a count gains nothing from compiled
    expressions, and above ``jit_above_cost`` (a 10-million-row table) the server
    compiled them for every backup."""
    tables = [(r[0], r[1]) for r in session.query(
        "SET LOCAL max_parallel_workers_per_gather = 0;\nSET LOCAL jit = off;\n"
        + TABLES_SQL)]
    if not tables:
        return ()
    return tuple((r[0], r[1], int(r[2])) for r in session.query(row_counts_sql(tables)))


def begin_snapshot(session: PsqlSession) -> SnapshotFacts:
    """Open a REPEATABLE READ transaction, export its snapshot and read the facts of
    the manifest (exact row counts) in it. The transaction stays open."""
    snap = open_snapshot(session)
    return SnapshotFacts(snapshot_id=snap.snapshot_id, server_version=snap.server_version,
                         database_size=snap.database_size, tables=count_rows(session),
                         wal_lsn=snap.wal_lsn)
