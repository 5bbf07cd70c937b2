"""The PostgreSQL client tools that match a server: pg_dump refuses a newer server, so
each database is dumped with the same major version's client, or the newest newer one
installed (``/usr/lib/postgresql/<major>/bin``, or ``$LABKEEPER_PG_BIN_ROOT``)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace
from pathlib import Path

from labkeeper.errors import CommandError, PermanentError
from labkeeper.postgres import Conn, pg_dump_version, psql_argv, query

BIN_ROOT_ENV = "LABKEEPER_PG_BIN_ROOT"
DEFAULT_BIN_ROOT = Path("/usr/lib/postgresql")
CLIENT_PACKAGE = "postgresql-client-{major}"
"""Debian's (and PGDG's) package of one major version's client tools."""
_known_majors: ContextVar[dict[tuple[str, int], Future[int]] | None] = ContextVar(
    "labkeeper_known_server_majors", default=None)
_asking = threading.Lock()  # who asks a server first, among a run's threads


class ClientMissing(PermanentError):
    """No installed client can talk to this server (pg_dump refuses a newer server)."""

    def __init__(self, message: str, *, server_major: int, package: str) -> None:
        super().__init__(message)
        self.server_major = server_major
        self.package = package


def bin_root() -> Path:
    """Where major-version client directories live: ``$LABKEEPER_PG_BIN_ROOT`` or
    ``/usr/lib/postgresql`` (``<root>/<major>/bin/pg_dump``)."""
    return Path(os.environ.get(BIN_ROOT_ENV) or DEFAULT_BIN_ROOT)


def installed_clients(root: Path | None = None) -> dict[int, Path]:
    """Major version -> bin directory, for every ``<root>/<major>/bin`` holding pg_dump,
    psql and pg_restore."""
    root = root or bin_root()
    out: dict[int, Path] = {}
    try:
        entries = list(root.iterdir())
    except OSError:
        return out
    for entry in entries:
        bindir = entry / "bin"
        if entry.name.isdigit() and all(os.access(bindir / t, os.X_OK)
                                        for t in ("pg_dump", "psql", "pg_restore")):
            out[int(entry.name)] = bindir
    return dict(sorted(out.items()))


def choose_client(server_major: int, installed: Mapping[int, Path | None]) -> int | None:
    """The client major to use for a server: the same major, else the newest newer one
    (pg_dump dumps older servers, never newer ones); None when none fits."""
    if server_major in installed:
        return server_major
    newer = [m for m in installed if m > server_major]
    return max(newer) if newer else None


def major_of(version_num: int) -> int:
    """``server_version_num`` -> major: 170012 -> 17, 150018 -> 15, 90624 -> 9.6 as 9."""
    return version_num // 10000


def missing_client_message(server_major: int, address: str,
                           installed: Mapping[int, Path | None], root: Path) -> str:
    have = ", ".join(str(m) for m in installed) or "none"
    package = CLIENT_PACKAGE.format(major=server_major)
    return (f"the PostgreSQL server at {address} is version {server_major}, but no client "
            f"tools of version {server_major} or newer are installed under {root} "
            f"(installed: {have}); pg_dump refuses a newer server. Install "
            f"{package} (apt install {package}, from the PostgreSQL apt repository "
            "(PGDG) or a newer Debian release)")


def server_version_num(conn: Conn, *, timeout: float = 30) -> int:
    rows = query(conn, "SHOW server_version_num;", timeout=timeout)
    try:
        return int(rows[0][0])
    except (IndexError, ValueError):
        raise CommandError(f"unexpected answer to SHOW server_version_num: {rows!r}",
                           argv=psql_argv(conn), returncode=0) from None


@contextmanager
def majors_remembered() -> Iterator[None]:
    """Within this block (one job's run, its task threads included: they run in copies
    of this context), each server's major version is asked once: ten databases on one
    server cost one ``SHOW server_version_num`` (≈30-60 ms each), not ten, and threads
    that want it while it is being asked wait for that answer."""
    token = _known_majors.set({})
    try:
        yield
    finally:
        _known_majors.reset(token)


def server_major(conn: Conn, *, timeout: float = 30) -> int:
    """The server's major version; asked once per server (host and port) inside
    :func:`majors_remembered`, every time outside it. Threads that wait for a question
    being asked get its answer or its failure; a failed question is not remembered."""
    known = _known_majors.get()
    if known is None:
        return major_of(server_version_num(conn, timeout=timeout))
    key = (conn.host, conn.port)
    with _asking:
        answer = known.get(key)
        mine = answer is None
        if answer is None:
            answer = known[key] = Future()
    if not mine:
        try:
            return answer.result(timeout=timeout)  # its failure too: it just happened
        except TimeoutError:  # the asker is stuck: ask ourselves
            return major_of(server_version_num(conn, timeout=timeout))
    try:
        major = major_of(server_version_num(conn, timeout=timeout))
    except BaseException as exc:
        with _asking:
            known.pop(key, None)
        answer.set_exception(exc)
        raise
    answer.set_result(major)
    return major


def _path_client() -> dict[int, Path | None]:
    """The major of the ``pg_dump`` on PATH (bin directory None: use PATH), when the
    bin root has no versioned directories (a non-Debian layout)."""
    try:
        version = pg_dump_version()
    except CommandError:
        return {}
    head = version.split(".", 1)[0]
    return {int(head): None} if head.isdigit() else {}


def with_matching_client(conn: Conn, *, root: Path | None = None,
                         timeout: float = 30) -> Conn:
    """``conn`` with the client tools matching its server (detected with the newest
    installed psql). Raises :class:`ClientMissing`, naming the package to install and
    the address used, when no installed client is new enough; connection problems
    raise as :func:`query` does."""
    root = root or bin_root()
    installed: dict[int, Path | None] = {**installed_clients(root)} or _path_client()
    newest = installed[max(installed)] if installed else None
    probe = replace(conn, client=replace(conn.client, bindir=str(newest) if newest else None))
    major = server_major(probe, timeout=timeout)
    chosen = choose_client(major, installed)
    if chosen is None:
        raise ClientMissing(missing_client_message(major, conn.address, installed, root),
                            server_major=major, package=CLIENT_PACKAGE.format(major=major))
    bindir = installed[chosen]
    return replace(conn, client=replace(conn.client, bindir=str(bindir) if bindir else None,
                                        server_major=major))
