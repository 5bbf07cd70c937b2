"""labkeeper.pg_client.server_major: a server's major version asked once per job run."""

from __future__ import annotations

import contextvars
import sys
import threading
import time

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


def _slow_asker(monkeypatch: pytest.MonkeyPatch, answer: int | None
                ) -> tuple[list[int], threading.Event, threading.Event]:
    """``server_version_num`` that blocks until released: ``answer``, or fails (None)
    the first time and answers 170004 after."""
    calls: list[int] = []
    asking, release = threading.Event(), threading.Event()

    def ask(conn: Conn, *, timeout: float = 30) -> int:
        calls.append(conn.port)
        if len(calls) == 1:
            asking.set()
            assert release.wait(30)
            if answer is None:
                raise CommandError("connection reset", argv=("psql",), returncode=2)
            return answer
        return 170004

    monkeypatch.setattr(pg_client, "server_version_num", ask)
    return calls, asking, release


def _wait_until_waiting_for_an_answer(t: threading.Thread) -> None:
    """Until ``t`` blocks in ``Future.result`` (the answer another thread asks for)."""
    deadline = time.monotonic() + 30
    while True:
        frame = sys._current_frames().get(t.ident or -1)
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        if "result" in names and "server_major" in names:
            return
        assert t.is_alive() and time.monotonic() < deadline, names
        time.sleep(0.01)


def _in_thread(got: list[object]) -> threading.Thread:
    def run() -> None:
        try:
            got.append(pg_client.server_major(_conn(5432)))
        except CommandError as exc:
            got.append(exc)

    t = threading.Thread(target=contextvars.copy_context().run, args=(run,))
    t.start()
    return t


def _asked_while_another_waits(release: threading.Event, asking: threading.Event
                               ) -> tuple[list[object], list[object]]:
    """Inside a run: one thread asks (blocked until ``release``), a second wants the same
    server's major meanwhile and is seen waiting; then the question ends. What each got."""
    first: list[object] = []
    second: list[object] = []
    t1 = _in_thread(first)
    assert asking.wait(30)
    t2 = _in_thread(second)
    _wait_until_waiting_for_an_answer(t2)
    release.set()
    t1.join(30)
    t2.join(30)
    return first, second


def test_a_thread_wanting_a_major_being_asked_waits_for_that_answer_not_asking_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls, asking, release = _slow_asker(monkeypatch, 160003)
    with pg_client.majors_remembered():
        first, second = _asked_while_another_waits(release, asking)
    assert first == second == [16] and calls == [5432]


def test_threads_waiting_for_a_question_that_fails_get_its_failure_and_it_is_not_remembered(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls, asking, release = _slow_asker(monkeypatch, None)
    with pg_client.majors_remembered():
        first, second = _asked_while_another_waits(release, asking)
        third = pg_client.server_major(_conn(5432))  # the failure was not remembered
    assert isinstance(first[0], CommandError) and second == first  # one question, one answer
    assert third == 17 and calls == [5432, 5432]
