"""Dropping a database labkeeper made while a session it may not end is still in it
(autovacuum on a freshly restored copy; here a superuser's session): ``WITH (FORCE)`` is
refused, the plain drop waits for the session to go and succeeds."""

from __future__ import annotations

import secrets
import threading
import time

import pytest
from pydantic import SecretStr

from labkeeper import pg_drop, postgres
from labkeeper.errors import CommandError

pytestmark = pytest.mark.integration


def _app_conn(lab) -> postgres.Conn:
    pw = lab.postgres.password_file.read_text().strip()
    return postgres.Conn(host=lab.postgres.host, port=lab.postgres.port, dbname="postgres",
                         user=lab.postgres.app_user, password=SecretStr(pw))


def _sessions_in(lab, name: str) -> int:
    out = lab.postgres.psql_super(
        f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{name}';")
    return int(out.split()[0])


def _exists(lab, name: str) -> bool:
    out = lab.postgres.psql_super(
        f"SELECT count(*) FROM pg_database WHERE datname = '{name}';")
    return out.split()[0] == "1"


def test_a_session_force_may_not_end_is_waited_out_and_the_copy_is_dropped(lab):
    name = f"labkeeper_drill_droptest_{secrets.token_hex(4)}"
    lab.postgres.psql_super(f"CREATE DATABASE {name} OWNER {lab.postgres.app_user};")
    holder = threading.Thread(
        target=lab.postgres.psql_super, args=("SELECT pg_sleep(3);",),
        kwargs={"db": name}, daemon=True)
    holder.start()
    deadline = time.monotonic() + 30
    while _sessions_in(lab, name) == 0:
        assert time.monotonic() < deadline, "the superuser session never connected"
        time.sleep(0.05)
    conn = _app_conn(lab)
    with pytest.raises(CommandError, match="must be a superuser to terminate"):
        postgres.query(conn, pg_drop.drop_sql(name, force=True), timeout=60)
    pg_drop.drop_database(conn, name, timeout=60, wait=60)
    assert not _exists(lab, name)
    holder.join(timeout=30)

