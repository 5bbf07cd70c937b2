"""A pipeline's consumer started ahead of its pipeline (process.EarlyStart): taken over
when it fits, stopped (never given end-of-stream) when nobody takes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from labkeeper import process
from labkeeper.errors import CommandNotFound
from labkeeper.process import EarlyStart, Stage
from tests.fixtures.waiting import wait_until

PY = sys.executable

# A consumer that notes its pid, a SIGINT (then exits 130, as restic does), and a clean
# end-of-stream with the bytes it read; "ignore" makes it ignore SIGINT. Each note
# appears whole (written aside, then renamed): a test that sees the file can read it.
CONSUMER = """
import os, pathlib, signal, sys
d = pathlib.Path(sys.argv[1])
def note(name, text):
    (d / (name + ".part")).write_text(text)
    (d / (name + ".part")).rename(d / name)
def on_int(*_):
    note("sigint", "1")
    os._exit(130)
signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[2:] == ["ignore"] else on_int)
note("pid", str(os.getpid()))
n = 0
while chunk := sys.stdin.buffer.read(65536):
    n += len(chunk)
note("eof", str(n))
print("done", n)
"""

FAILING = "import sys; sys.stderr.write('boom: no such repository\\n'); sys.exit(3)"


def consumer(d: Path, *extra: str) -> Stage:
    return Stage((PY, "-c", CONSUMER, str(d), *extra), env={"EARLY_TEST": "1"})


def producer(n: int = 100_000) -> Stage:
    return Stage((PY, "-c", f"import sys; sys.stdout.write('x' * {n})"))


def with_early(stage: Stage, early: EarlyStart) -> Stage:
    return Stage(stage.argv, codes=stage.codes, env=stage.env, early=early)


def started(d: Path) -> int:
    wait_until(lambda: (d / "pid").exists(), timeout=30, what="the consumer to start")
    return int((d / "pid").read_text())


def test_a_consumer_started_ahead_is_taken_over_by_its_pipeline_and_gets_the_stream(tmp_path):
    early = EarlyStart(consumer(tmp_path), expires=60)
    pid = started(tmp_path)
    res = process.pipeline([producer(), with_early(consumer(tmp_path), early)], timeout=60)
    assert res.eof_given == (True,) and res.bytes_relayed == (100_000,)
    assert (tmp_path / "eof").read_text() == "100000"
    assert int((tmp_path / "pid").read_text()) == pid  # no second consumer started
    assert res.stages[1].stdout.strip() == "done 100000"
    assert not early.waiting and early.stop() is None  # taken: stop() leaves it alone


def test_a_consumer_nobody_takes_is_stopped_with_sigint_and_never_sees_end_of_stream(
        tmp_path):
    cleaned: list[bool] = []
    early = EarlyStart(consumer(tmp_path), expires=60, after_stop=lambda: cleaned.append(True))
    started(tmp_path)
    assert early.stop(why="test") == 130
    assert (tmp_path / "sigint").exists() and not (tmp_path / "eof").exists()
    assert not early.waiting
    assert early.stop(why="again") == 130 and cleaned == [True]  # cleaned up once


def test_the_clean_up_runs_only_after_stopping_a_running_consumer(tmp_path):
    cleaned: list[str] = []
    taken = EarlyStart(consumer(tmp_path), expires=60, after_stop=lambda: cleaned.append("taken"))
    started(tmp_path)
    process.pipeline([producer(10), with_early(consumer(tmp_path), taken)], timeout=60)
    taken.stop()
    failed = EarlyStart(Stage((PY, "-c", FAILING)), expires=60,
                        after_stop=lambda: cleaned.append("failed"))
    wait_until(lambda: not _running(failed.pid), timeout=30, what="the consumer to fail")
    assert failed.stop() == 3
    assert cleaned == []  # nothing of theirs was left to clean up


def test_a_clean_up_that_fails_is_logged_not_raised(tmp_path, caplog):
    def boom() -> None:
        raise RuntimeError("unlock failed: backend unreachable")

    early = EarlyStart(consumer(tmp_path), expires=60, after_stop=boom)
    started(tmp_path)
    assert early.stop(why="test") == 130
    assert "clean-up after stopping it failed: unlock failed" in caplog.text


def test_a_consumer_not_taken_in_time_stops_on_its_own(tmp_path):
    early = EarlyStart(consumer(tmp_path), expires=0.5)
    pid = started(tmp_path)
    wait_until(lambda: (tmp_path / "sigint").exists(), timeout=30, what="the expiry's SIGINT")
    assert not early.waiting
    wait_until(lambda: not _running(pid), timeout=30, what="the consumer to exit")
    assert not (tmp_path / "eof").exists()
    # A pipeline given it afterwards starts its own consumer.
    res = process.pipeline([producer(10), with_early(consumer(tmp_path), early)], timeout=60)
    assert res.eof_given == (True,) and int((tmp_path / "pid").read_text()) != pid


def test_a_consumer_started_as_another_command_is_stopped_and_the_pipeline_starts_its_own(
        tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    early = EarlyStart(consumer(other), expires=60)
    started(other)
    res = process.pipeline([producer(), with_early(consumer(tmp_path), early)], timeout=60)
    assert res.eof_given == (True,) and (tmp_path / "eof").read_text() == "100000"
    assert (other / "sigint").exists() and not (other / "eof").exists()


def test_a_consumer_with_another_environment_is_not_taken(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    stage = consumer(other)
    early = EarlyStart(stage, expires=60)
    pid = started(other)
    changed = Stage(stage.argv, env={"EARLY_TEST": "2"}, early=early)
    process.pipeline([producer(10), changed], timeout=60)
    assert (other / "sigint").exists()
    assert int((other / "pid").read_text()) != pid  # the pipeline's own consumer ran


def test_a_pipeline_that_cannot_take_it_stops_it_and_starts_its_own(tmp_path):
    out = tmp_path / "out.txt"
    early = EarlyStart(consumer(tmp_path), expires=60)
    pid = started(tmp_path)
    with out.open("wb") as f:
        res = process.pipeline([producer(), with_early(consumer(tmp_path), early)],
                               timeout=60, stdout_fd=f.fileno())
    assert res.eof_given == (True,)
    assert out.read_text().strip() == "done 100000"
    assert int((tmp_path / "pid").read_text()) != pid


def test_a_consumer_that_failed_before_it_was_taken_fails_its_pipeline_with_its_own_error(
        tmp_path):
    stage = Stage((PY, "-c", FAILING))
    early = EarlyStart(stage, expires=60)
    wait_until(lambda: not _running(early.pid), timeout=30, what="the consumer to fail")
    res = process.pipeline([producer(10_000_000), with_early(stage, early)], timeout=60,
                           check=False)
    assert res.stages[1].returncode == 3
    assert "boom: no such repository" in res.stages[1].stderr
    assert res.eof_given == (False,)


def _running(pid: int) -> bool:
    try:
        return b"State:\tZ" not in Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return False


def test_a_consumer_ignoring_sigint_is_killed_after_the_grace_without_end_of_stream(tmp_path):
    early = EarlyStart(consumer(tmp_path, "ignore"), expires=60, stop_grace=0.5)
    started(tmp_path)
    assert early.stop(why="test") == -signal.SIGKILL
    assert not (tmp_path / "eof").exists()


SCRIPT = """
import sys
from labkeeper.process import EarlyStart, Stage
early = EarlyStart(Stage((sys.executable, "-c", sys.argv[1], sys.argv[2])), expires=600)
import time, pathlib
d = pathlib.Path(sys.argv[2])
while not (d / "pid").exists():
    time.sleep(0.01)
print(early.pid)
"""


def test_a_process_ending_normally_stops_its_waiting_consumers_without_end_of_stream(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    res = subprocess.run([PY, "-c", SCRIPT, CONSUMER, str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == (tmp_path / "pid").read_text()
    assert (tmp_path / "sigint").exists() and not (tmp_path / "eof").exists()


def test_an_early_start_needs_a_positive_expiry_and_an_existing_command(tmp_path):
    with pytest.raises(ValueError, match="expires"):
        EarlyStart(consumer(tmp_path), expires=0)
    with pytest.raises(CommandNotFound, match="command not found"):
        EarlyStart(Stage(("labkeeper-no-such-command",)), expires=5)
