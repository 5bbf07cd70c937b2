"""The progress reporter (labkeeper/progress.py) on a fake clock: interval, steps,
rate, ETA, estimates, the closing line, a broken log handler. Lines are records of the
``labkeeper.progress`` logger."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

import pytest

from labkeeper import progress as pm

MiB = 1024 * 1024


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Lines(Sequence[str]):
    """The lines the ``labkeeper.progress`` logger wrote so far, read from ``caplog``."""

    def __init__(self, caplog: pytest.LogCaptureFixture) -> None:
        self.caplog = caplog

    def _now(self) -> list[str]:
        return [r.getMessage() for r in self.caplog.records if r.name == "labkeeper.progress"]

    def __getitem__(self, i):  # type: ignore[override]
        return self._now()[i]

    def __len__(self) -> int:
        return len(self._now())

    def __eq__(self, other: object) -> bool:
        return self._now() == other

    def __repr__(self) -> str:
        return repr(self._now())


@pytest.fixture
def progress_lines(caplog) -> _Lines:
    """Every line the progress reporter logs during the test, in order."""
    caplog.set_level(logging.INFO, logger="labkeeper")
    return _Lines(caplog)


@pytest.fixture
def reporter(progress_lines):
    def make(total: int | None = None, *, estimate: bool = False, interval: float = 30.0
             ) -> tuple[pm.Progress, list[str], FakeClock]:
        clock = FakeClock()
        p = pm.Progress("db1: dump", total=total, estimate=estimate, interval=interval,
                        bar=False, clock=clock)
        return p, progress_lines, clock
    return make


def test_no_line_before_the_interval_without_a_total(reporter):
    p, lines, clock = reporter()
    clock.now += 29
    p.add(10 * MiB)
    assert lines == []


def test_a_line_every_interval_with_bytes_and_rate_but_no_eta_without_a_total(reporter):
    p, lines, clock = reporter()
    clock.now += 30
    p.add(60 * MiB)
    clock.now += 10
    p.add(MiB)  # within the interval: nothing
    clock.now += 20
    p.add(MiB)
    assert lines == ["db1: dump: 60.0 MiB · 2.0 MiB/s", "db1: dump: 62.0 MiB · 1.0 MiB/s"]
    assert all("ETA" not in ln for ln in lines)


def test_a_known_total_gives_percent_rate_and_eta_at_the_average_rate(reporter):
    p, lines, clock = reporter(total=100 * MiB)
    clock.now += 30
    p.update(25 * MiB)
    assert lines == ["db1: dump: 25.0 MiB of 100.0 MiB (25%) · 853.3 KiB/s · ETA 1m30s"]


def test_each_ten_percent_step_logs_a_line_but_not_within_a_sixth_of_the_interval(reporter):
    p, lines, clock = reporter(total=100 * MiB, interval=60.0)
    clock.now += 5  # < 60 / 6: too soon even though 10 % passed
    p.update(11 * MiB)
    assert lines == []
    clock.now += 5  # 10 s since start: the step counts now
    p.update(12 * MiB)
    clock.now += 2
    p.update(21 * MiB)  # next step, but 2 s after the last line: nothing
    clock.now += 3
    p.update(22 * MiB)  # 5 s after: still nothing
    clock.now += 5
    p.update(23 * MiB)  # 10 s after: the step's line
    clock.now += 11
    p.update(25 * MiB)  # same step: nothing
    assert [ln.split(" · ")[0] for ln in lines] == [
        "db1: dump: 12.0 MiB of 100.0 MiB (12%)", "db1: dump: 23.0 MiB of 100.0 MiB (23%)"]


def test_an_estimated_total_is_marked_and_an_outgrown_estimate_drops_the_eta(reporter):
    p, lines, clock = reporter(total=10 * MiB, estimate=True)
    clock.now += 30
    p.update(5 * MiB)
    clock.now += 30
    p.update(12 * MiB)
    assert lines[0].startswith("db1: dump: 5.0 MiB of ~10.0 MiB (50%)") and "ETA 30s" in lines[0]
    assert lines[1].startswith("db1: dump: 12.0 MiB (more than the ~10.0 MiB expected)")
    assert "ETA" not in lines[1]


def test_set_total_later_starts_percent_and_eta(reporter):
    p, lines, clock = reporter()
    p.set_total(40 * MiB, estimate=True)
    clock.now += 30
    p.add(10 * MiB)
    assert lines == ["db1: dump: 10.0 MiB of ~40.0 MiB (25%) · 341.3 KiB/s · ETA 1m30s"]


def test_finish_closes_with_a_done_line_only_after_progress_lines_and_only_once(reporter):
    quiet, quiet_lines, clock = reporter()
    quiet.add(MiB)
    quiet.finish()
    assert quiet_lines == []  # a stream shorter than the interval logs nothing of its own
    p, lines, clock = reporter(total=90 * MiB)
    clock.now += 30
    p.update(60 * MiB)
    clock.now += 15
    p.update(90 * MiB)
    with p:
        pass
    p.finish()
    assert lines[-1] == "db1: dump: done, 90.0 MiB in 45s · 2.0 MiB/s"
    assert sum("done" in ln for ln in lines) == 1


def test_chunks_added_from_several_threads_all_count(reporter):
    p, _lines, _clock = reporter(total=4000)
    threads = [threading.Thread(target=lambda: [p.add(1) for _ in range(1000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.done == 4000


class _Broken(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise OSError("log gone")


def test_a_log_handler_that_raises_does_not_break_the_stream(progress_lines):
    logger = logging.getLogger("labkeeper.progress")
    broken = _Broken()
    logger.addHandler(broken)
    try:
        clock = FakeClock()
        p = pm.Progress("x", interval=1.0, bar=False, clock=clock)
        clock.now += 2
        p.add(5)
        p.finish()
    finally:
        logger.removeHandler(broken)
    assert p.done == 5 and p.lines == 1


def test_a_non_positive_interval_is_refused():
    with pytest.raises(ValueError):
        pm.Progress("x", interval=0, bar=False)


def test_the_bar_runs_and_stops_with_its_streams_when_asked_for():
    clock = FakeClock()
    a = pm.Progress("a", total=100, bar=True, clock=clock)
    b = pm.Progress("b", bar=True, clock=clock)
    assert pm._BARS.display is not None and pm._BARS.users == 2
    a.update(50)
    b.add(10)
    a.finish()
    assert pm._BARS.display is not None  # b still runs
    b.finish()
    assert pm._BARS.display is None


@pytest.mark.parametrize(("n", "text"), [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"),
                                         (5 * 1024**4, "5.0 TiB")])
def test_human_bytes_uses_binary_units(n, text):
    assert pm.human_bytes(n) == text


@pytest.mark.parametrize(("s", "text"), [(7, "7s"), (185, "3m05s"), (7300, "2h01m40s"),
                                         (-3, "0s")])
def test_human_duration_reads_like_a_clock(s, text):
    assert pm.human_duration(s) == text
