"""flows/heartbeat.py: heartbeats as Prefect sends them, without the end's one-second wait."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from prefect import flow_engine

from flows import heartbeat


class FakeEngine:
    """What the heartbeat context reads of Prefect's flow run engine."""

    def __init__(self, seconds: int | None) -> None:
        self.heartbeat_seconds = seconds
        self.flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: False))
        self.sent: list[float] = []
        self.beat = threading.Event()
        self.logger = SimpleNamespace(debug=lambda *a, **k: None)

    def _build_heartbeat_event_template(self) -> tuple[dict[str, Any], list[Any]]:
        return {"prefect.resource.id": "prefect.flow-run.x"}, []

    def _emit_flow_run_heartbeat(self, resource: Any, related: Any) -> None:
        self.sent.append(time.monotonic())
        self.beat.set()


def _wait_for(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_importing_flows_installs_the_prompt_heartbeat() -> None:
    assert flow_engine._send_heartbeats is heartbeat.send_heartbeats


def test_block_end_with_a_thirty_second_period_returns_without_waiting() -> None:
    engine = FakeEngine(30)
    before = set(threading.enumerate())
    with heartbeat.send_heartbeats(engine):
        assert engine.beat.wait(10), "first heartbeat is sent at the start"
        started = time.monotonic()
    ended = time.monotonic() - started
    # Prefect's own loop sleeps whole seconds, so its join takes up to one
    assert ended < 0.5, f"block end waited {ended:.2f} s"
    assert not [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert len(engine.sent) == 1


def test_heartbeats_repeat_every_period_until_the_block_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL", 0)
    engine = FakeEngine(0)
    engine.heartbeat_seconds = 0.02  # type: ignore[assignment]
    with heartbeat.send_heartbeats(engine):
        assert _wait_for(lambda: len(engine.sent) >= 3)
    count = len(engine.sent)
    time.sleep(0.1)  # nothing more may arrive after the end: checked over five periods
    assert len(engine.sent) == count


def test_period_below_prefects_minimum_is_raised_to_it() -> None:
    engine = FakeEngine(1)
    with heartbeat.send_heartbeats(engine):
        assert engine.beat.wait(10)
        time.sleep(1.5)  # a 1 s period would have sent a second heartbeat by now
    assert len(engine.sent) == 1


def test_run_in_a_final_state_sends_no_heartbeat() -> None:
    engine = FakeEngine(30)
    engine.flow_run = SimpleNamespace(state=SimpleNamespace(is_final=lambda: True))
    with heartbeat.send_heartbeats(engine):
        time.sleep(0.05)
    assert engine.sent == []


def test_no_heartbeat_frequency_starts_no_thread() -> None:
    engine = FakeEngine(None)
    before = threading.active_count()
    with heartbeat.send_heartbeats(engine):
        assert threading.active_count() == before
    assert engine.sent == []


def test_failed_heartbeat_does_not_fail_the_run() -> None:
    engine = FakeEngine(30)
    calls: list[int] = []

    def boom(resource: Any, related: Any) -> None:
        calls.append(1)
        raise ConnectionError("server away")

    engine._emit_flow_run_heartbeat = boom  # type: ignore[method-assign]
    with heartbeat.send_heartbeats(engine):
        assert _wait_for(lambda: calls)
    assert calls == [1]


def test_prefect_without_the_hook_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(flow_engine, "_send_heartbeats")
    assert heartbeat.install() is False
    assert not hasattr(flow_engine, "_send_heartbeats")
