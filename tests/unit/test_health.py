"""Health probes (pure judges) and the gate's timing, with a fake clock."""

from __future__ import annotations

import logging

import pytest

from labkeeper import health
from labkeeper.inventory import App, CommandProbe, Gate, HttpProbe, Probe


def test_http_status_must_match_exactly():
    spec = HttpProbe(url="http://127.0.0.1:1/x", status=200)
    assert health.judge_http(spec, 200, "") == (True, "HTTP 200")
    ok, why = health.judge_http(spec, 302, "")
    assert not ok and "expected 200" in why


def test_http_body_text_is_required_when_configured():
    spec = HttpProbe(url="http://127.0.0.1:1/x", body_contains="pong")
    assert health.judge_http(spec, 200, "..pong..")[0]
    ok, why = health.judge_http(spec, 200, "ping")
    assert not ok and "'pong'" in why
    assert not health.judge_http(spec, 200, None)[0]


def test_http_head_ignores_body_text():
    spec = HttpProbe(url="http://127.0.0.1:1/x", body_contains="pong", method="HEAD")
    assert health.judge_http(spec, 200, None)[0]


def test_command_exit_code_and_stdout_text():
    spec = CommandProbe(argv=["true"], expect_exit=0, stdout_contains="ready")
    assert health.judge_command(spec, 0, "all ready\n")[0]
    assert "stdout lacks" in health.judge_command(spec, 0, "booting")[1]
    assert "expected 0" in health.judge_command(spec, 1, "ready")[1]
    assert not health.judge_command(spec, None, "ready")[0]


def test_probe_names_default_to_what_they_check():
    assert health.probe_name(Probe(tcp={"host": "10.0.0.5", "port": 22})) == "tcp 10.0.0.5:22"
    assert health.probe_name(Probe(name="api", http={"url": "http://a.b/"})) == "api"
    assert health.probe_name(Probe(command={"argv": ["systemctl", "is-active", "x"]})) == \
        "command systemctl is-active x"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def rounds(*oks: bool):
    seq = list(oks)

    def fn() -> list[health.ProbeResult]:
        ok = seq.pop(0) if seq else oks[-1]
        return [health.ProbeResult("p", "http", ok, "fine" if ok else "HTTP 502")]
    return fn


def test_gate_waits_the_initial_delay_then_needs_n_successes_in_a_row():
    clock = FakeClock()
    gate = Gate(initial_delay=10, interval=5, deadline=60, successes=3)
    out = health.run_gate(rounds(True, False, True, True, True), gate, clock=clock,
                          sleep=clock.sleep)
    assert out.passed and out.rounds == 5
    assert clock.sleeps == [10, 5, 5, 5, 5]
    assert out.seconds == 30


def test_gate_fails_at_the_deadline_naming_the_failing_probe():
    clock = FakeClock()
    gate = Gate(initial_delay=1, interval=2, deadline=9, successes=2)
    out = health.run_gate(rounds(False), gate, clock=clock, sleep=clock.sleep)
    assert not out.passed
    assert "HTTP 502" in out.reason and "9s" in out.reason
    assert clock.now == 9 and out.rounds == 5  # t = 1, 3, 5, 7, 9; the next would pass 9


def test_gate_streak_resets_on_a_failure_so_flapping_never_opens_it():
    clock = FakeClock()
    gate = Gate(initial_delay=0, interval=1, deadline=20, successes=2)
    out = health.run_gate(rounds(*([True, False] * 20)), gate, clock=clock, sleep=clock.sleep)
    assert not out.passed and out.rounds == 21


def test_each_gate_round_is_logged_with_the_label_in_front(caplog):
    caplog.set_level(logging.INFO, logger="labkeeper")
    clock = FakeClock()
    gate = Gate(initial_delay=0, interval=1, deadline=5, successes=1)
    health.run_gate(rounds(False, True), gate, clock=clock, sleep=clock.sleep, label="wiki")
    health.run_gate(rounds(True), gate, clock=clock, sleep=clock.sleep)
    said = [r.getMessage() for r in caplog.records if r.name == "labkeeper.health"]
    assert said == ["wiki: health round 1: p: HTTP 502 (0/1 in a row, 0.0s)",
                    "wiki: health round 2: ok (1/1 in a row, 1.0s)",
                    "health round 1: ok (1/1 in a row, 0.0s)"]


def test_gate_with_one_success_needed_opens_on_the_first_good_round():
    clock = FakeClock()
    out = health.run_gate(rounds(True), Gate(initial_delay=0, interval=1, deadline=5,
                                             successes=1), clock=clock, sleep=clock.sleep)
    assert out.passed and out.rounds == 1


def test_tracker_is_pure_and_sticky():
    t = health.GateTracker(Gate(initial_delay=0, interval=1, deadline=3, successes=2))
    assert t.record(0, True) == "pending"
    assert t.record(1, True) == "passed"
    assert t.record(2, False) == "passed"
    t2 = health.GateTracker(Gate(initial_delay=0, interval=1, deadline=3, successes=2))
    assert t2.record(3, False) == "failed"


def test_a_round_without_probes_passes_and_says_so():
    app = App(name="x", guest="g", strategy="commands", commands={"update": [["true"]]})
    assert health.run_round(app) == []
    assert health.round_ok([]) and health.summary([]) == "no probes"


def test_ssh_probe_without_a_connection_is_a_programming_error():
    app = App(name="x", guest="g", strategy="commands", commands={"update": [["true"]]},
              health=[{"command": {"argv": ["true"]}}])
    with pytest.raises(ValueError, match="SSH"):
        health.run_round(app)
