"""Streamed restore of a PostgreSQL dump out of restic, and how its result is judged.

``restic dump <snap> <path> | psql`` (``| pg_restore`` for custom-format dumps) as one
:func:`labkeeper.process.pipeline`, no temporary file; ``restic dump`` carries the
dump-complete gate, so a truncated dump never reaches psql's end-of-stream. Then the
pure judges: restore errors (expected: roles missing on the target), table row
counts against the manifest, smoke queries. Used by the database drill and by
:mod:`labkeeper.restore`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labkeeper import pg_backup, postgres, process, restic
from labkeeper.drill.result import STALL_TIMEOUT, Check
from labkeeper.errors import LabkeeperError, TransientError
from labkeeper.inventory import SmokeQuery
from labkeeper.process import ExitCode, ExitCodeTable

# =====================================================================================
# argv builders (pure)
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


# =====================================================================================
# judging the restore (pure)
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
# the streamed restore (side effects)
# =====================================================================================


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
