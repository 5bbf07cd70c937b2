"""labkeeper.pg_client.server_major: a server's major version asked once per job run."""

from __future__ import annotations

import contextvars
import threading

import pytest

from labkeeper import pg_client
from labkeeper.errors import CommandError
from labkeeper.postgres import Conn


@pytest.fixture
def asked(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    calls: list[tuple[str, int]] = []
    answers = {5432: 170004, 5433: 150012}

    def ask(conn: Conn, *, timeout: float = 30) -> int:
        calls.append((conn.host, conn.port))
        if conn.port not in answers:
            raise CommandError("connection refused", argv=("psql",), returncode=2)
        return answers[conn.port]

    monkeypatch.setattr(pg_client, "server_version_num", ask)
    return calls


def _conn(port: int, dbname: str = "app") -> Conn:
    return Conn(host="10.0.0.5", port=port, dbname=dbname, user="backup")


def test_inside_one_run_each_server_is_asked_once(asked: list[tuple[str, int]]) -> None:
    with pg_client.majors_remembered():
        majors = [pg_client.server_major(_conn(5432, db)) for db in ("a", "b", "c")]
        other = pg_client.server_major(_conn(5433))
        again = pg_client.server_major(_conn(5433, "z"))
    assert majors == [17, 17, 17] and other == again == 15
    assert asked == [("10.0.0.5", 5432), ("10.0.0.5", 5433)]


def test_outside_a_run_every_call_asks(asked: list[tuple[str, int]]) -> None:
    pg_client.server_major(_conn(5432))
    pg_client.server_major(_conn(5432))
    with pg_client.majors_remembered():
        pg_client.server_major(_conn(5432))
    pg_client.server_major(_conn(5432))  # the run's answers end with it
    assert len(asked) == 4


def test_a_failed_question_is_asked_again(asked: list[tuple[str, int]]) -> None:
    with pg_client.majors_remembered():
        for _ in range(2):
            with pytest.raises(CommandError):
                pg_client.server_major(_conn(6000))
    assert asked == [("10.0.0.5", 6000)] * 2


def test_a_task_thread_in_a_copy_of_the_runs_context_shares_its_answers(
        asked: list[tuple[str, int]]) -> None:
    got: list[int] = []
    with pg_client.majors_remembered():
        pg_client.server_major(_conn(5432))
        t = threading.Thread(target=contextvars.copy_context().run,
                             args=(lambda: got.append(pg_client.server_major(_conn(5432))),))
        t.start()
        t.join()
    assert got == [17] and len(asked) == 1
