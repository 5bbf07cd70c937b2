"""Dropping a database labkeeper made (a drill's scratch copy, a runbook's restored or
set-aside copy), also while autovacuum works in it.

``DROP DATABASE ... WITH (FORCE)`` ends the other sessions first, but only those the
caller may signal: for a role that is neither superuser nor in ``pg_signal_backend``,
an autovacuum worker (which has no role; it starts on a freshly restored copy) or a
superuser's session makes the whole statement fail (SQLSTATE 42501). A plain
``DROP DATABASE`` stops autovacuum workers itself and waits up to 5 s for the others,
so after that refusal we drop the plain way until the deadline.
"""

from __future__ import annotations

import logging
import time

from labkeeper import postgres
from labkeeper.errors import CommandError

log = logging.getLogger(__name__)

FORCE_REFUSED = (
    "must be a member of the role whose process is being terminated",
    "must be a superuser to terminate superuser process",
)
IN_USE = "is being accessed by other users"


def drop_sql(name: str, *, force: bool) -> str:
    """``DROP DATABASE IF EXISTS "name"`` (with ``WITH (FORCE)`` when ``force``)."""
    return (f"DROP DATABASE IF EXISTS {postgres.quote_ident(name)}"
            + (" WITH (FORCE);" if force else ";"))


def drop_database(conn: postgres.Conn, name: str, *, timeout: float = 300,
                  wait: float = 60) -> None:
    """Drop ``name`` (callers check that it is one labkeeper made). When ``FORCE`` is
    refused, retry the plain form for up to ``wait`` seconds; a session that stays
    longer fails with PostgreSQL's own words."""
    try:
        postgres.query(conn, drop_sql(name, force=True), timeout=timeout)
        return
    except CommandError as exc:
        if not any(m in str(exc) for m in FORCE_REFUSED):
            raise
        log.info("DROP DATABASE %s WITH (FORCE) refused (%s); dropping without FORCE",
                 name, exc)
    deadline = time.monotonic() + wait
    while True:
        try:
            postgres.query(conn, drop_sql(name, force=False), timeout=timeout)
            return
        except CommandError as exc:
            if IN_USE not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.5)
