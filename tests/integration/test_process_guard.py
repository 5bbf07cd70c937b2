"""The guard on a consumer's stdin (process.children.StdinGuard): when this process is
killed, the kernel closes its descriptors before it signals its children, so a consumer
could read a clean end-of-stream in between; a guard that dies with the consumer keeps
the pipe open until then. Deterministic checks: a pipe gives no end-of-stream while a
writer holds it open, whatever the timing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from labkeeper import process
from labkeeper.errors import PipelineError
from labkeeper.process.children import StdinGuard
from tests.fixtures.procs import gone, start_time
from tests.fixtures.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]


def _pipe_of(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


def _guards_under(pid: int) -> list[int]:
    """Our guards among the children of ``pid``: ``sleep infinity`` (setpriv execs it)."""
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            while argv and not argv[-1]:
                argv.pop()
            if len(argv) >= 2 and argv[-2].endswith(b"sleep") and argv[-1] == b"infinity":
                out.append(int(child))
    return out


def test_with_a_guard_closing_our_copy_of_the_pipe_is_no_end_of_stream(tmp_path):
    eof = tmp_path / "eof"
    r, w = os.pipe()
    consumer = subprocess.Popen(("sh", "-c", f"cat >/dev/null; touch {eof}"), stdin=r)
    os.close(r)
    guard = StdinGuard(w)
    try:
        assert guard.pid is not None
        assert _pipe_of(guard.pid, w) == _pipe_of(os.getpid(), w)  # it holds the same pipe
        os.close(w)  # what the kernel does to us when we are killed
        # The guard still writes-holds the pipe: the consumer cannot have an EOF.
        assert consumer.poll() is None and not eof.exists()
        guard.release()
        assert consumer.wait(timeout=30) == 0 and eof.exists()
    finally:
        guard.release()
        consumer.kill()
        consumer.wait()


def test_the_guard_dies_with_the_process_that_started_it(tmp_path):
    pidfile = tmp_path / "guard-pid"
    script = (f"import os, sys, time\nsys.path.insert(0, {str(ROOT)!r})\n"
              "from labkeeper.process.children import StdinGuard\n"
              "r, w = os.pipe()\ng = StdinGuard(w)\n"
              f"open({str(pidfile)!r} + '.tmp', 'w').write(str(g.pid))\n"
              f"os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\ntime.sleep(300)\n")
    holder = subprocess.Popen((sys.executable, "-c", script), start_new_session=True)
    try:
        wait_until(pidfile.exists, timeout=60, what="the guard to start")
        guard = int(pidfile.read_text())
        started = start_time(guard)
        assert started is not None
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        wait_until(lambda: gone(guard, started), timeout=30, what="the guard to die with it")
    finally:
        holder.kill()
        holder.wait()


def test_a_pipeline_consumer_is_guarded_until_its_end_of_stream_and_no_guard_outlives_it():
    seen: list[list[int]] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        seen.append(_guards_under(os.getpid()))  # the moment before we hand out EOF
        return None

    producer = process.Stage(("printf", "data"), eof_gate=gate)
    consumer = process.Stage(("cat",))
    result = process.pipeline([producer, consumer], timeout=60)
    assert result.stages[-1].stdout == "data" and result.eof_given == (True,)
    assert seen and len(seen[0]) == 1, f"guards before the end-of-stream: {seen}"
    assert _guards_under(os.getpid()) == []


def test_a_failed_producer_kills_the_consumer_and_lets_go_of_its_guard():
    producer = process.Stage(("sh", "-c", "printf data; exit 3"))
    consumer = process.Stage(("sh", "-c", "cat >/dev/null; echo EOF-SEEN"))
    with pytest.raises(PipelineError) as err:
        process.pipeline([producer, consumer], timeout=60)
    assert "EOF-SEEN" not in str(err.value)
    assert _guards_under(os.getpid()) == []


def test_an_early_started_consumer_is_guarded_from_its_start_until_it_is_stopped():
    early = process.EarlyStart(process.Stage(("cat",)), expires=60)
    try:
        assert early.guard is not None and early.guard.pid is not None
        assert early.guard.pid in _guards_under(os.getpid())
    finally:
        early.stop(why="test over")
    assert _guards_under(os.getpid()) == []


def test_a_guarded_coprocess_ends_only_at_its_end_of_stream(tmp_path):
    eof = tmp_path / "eof"
    co = process.Coprocess(("sh", "-c", f"cat >/dev/null; touch {eof}"), guard_stdin=True)
    try:
        guards = _guards_under(os.getpid())
        assert len(guards) == 1
        co.stdin.close()  # our own end closed without end_stdin(): still no EOF
        assert co.poll() is None and not eof.exists()
        co.end_stdin()
        assert co.wait(30) == 0 and eof.exists()
    finally:
        co.close(kill=True)
    assert _guards_under(os.getpid()) == []
