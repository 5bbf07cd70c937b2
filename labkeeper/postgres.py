"""PostgreSQL client tools (psql, pg_dump, pg_restore) through the process runner.

The password reaches the tools through ``PGPASSWORD`` in their environment,
never argv; connection parameters other than the password go in argv as
separate arguments.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

from pydantic import SecretStr

from labkeeper import process
from labkeeper.errors import CommandError
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

_TRANSIENT_STDERR = ("could not connect", "Connection refused", "server closed the connection",
                     "timeout expired", "the database system is starting up",
                     "the database system is shutting down", "too many clients")


@dataclass(frozen=True)
class Conn:
    host: str
    port: int
    dbname: str
    user: str
    password: SecretStr | None = None
    sslmode: str = "prefer"
    connect_timeout: int = 10

    def env(self) -> dict[str, str]:
        env = {"PGSSLMODE": self.sslmode, "PGCONNECT_TIMEOUT": str(self.connect_timeout),
               "PGAPPNAME": "labkeeper"}
        if self.password is not None:
            env["PGPASSWORD"] = self.password.get_secret_value()
        return env

    def conn_args(self) -> tuple[str, ...]:
        return ("-h", self.host, "-p", str(self.port), "-U", self.user, "-d", self.dbname)


def psql_argv(conn: Conn) -> tuple[str, ...]:
    """psql reading SQL from stdin, CSV out, stopping at the first error."""
    return ("psql", "-X", "-q", "--csv", "-v", "ON_ERROR_STOP=1", *conn.conn_args(), "-f", "-")


def parse_csv(stdout: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(stdout)))
    return rows[1:] if rows else []  # drop the header


def _classify(err: CommandError) -> CommandError:
    if not err.transient and any(s in err.stderr_tail for s in _TRANSIENT_STDERR):
        err.transient = True
    return err


def query(conn: Conn, sql: str, *, timeout: float = 60) -> list[list[str]]:
    """Run SQL (one statement whose result matters, last) and return its rows as text."""
    try:
        res = process.run(psql_argv(conn), timeout=timeout, codes=PSQL_CODES, env=conn.env(),
                          input=sql)
    except CommandError as exc:
        raise _classify(exc) from None
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
