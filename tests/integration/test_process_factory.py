"""A pipeline's first stage made by a factory, after the later stages have started
(the backup opens its database snapshot while restic derives its key)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from labkeeper import process
from labkeeper.errors import PipelineError
from labkeeper.process import Stage

PY = sys.executable

# A consumer that says it started, copies stdin to a file, and notes a clean EOF.
CONSUMER = """
import sys, pathlib
d = pathlib.Path(sys.argv[1])
(d / "started").write_text("1")
with open(d / "out", "wb") as f:
    while chunk := sys.stdin.buffer.read(65536):
        f.write(chunk)
(d / "eof").write_text("1")
"""


def _wait_for(path: Path, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return True
        time.sleep(0.01)
    return False


def _proc_text(pid: str, name: str) -> bytes:
    """``/proc/<pid>/<name>``, or b"" for a process that exited meanwhile."""
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def test_factory_runs_after_the_consumer_started_and_its_stage_feeds_it(tmp_path):
    calls = []

    def make() -> Stage:
        calls.append(_wait_for(tmp_path / "started"))  # the consumer is already up
        return Stage((PY, "-c", "import sys; sys.stdout.write('x' * 100000)"))

    res = process.pipeline([make, Stage((PY, "-c", CONSUMER, str(tmp_path)))], timeout=60)
    assert calls == [True]
    assert (tmp_path / "out").read_bytes() == b"x" * 100000
    assert (tmp_path / "eof").exists()
    assert res.bytes_relayed == (100000,) and res.eof_given == (True,)
    assert res.stages[0].argv[0] == PY and len(res.stages) == 2


def test_factory_that_raises_kills_the_started_consumer_before_any_eof(tmp_path):
    pids = []

    def make() -> Stage:
        assert _wait_for(tmp_path / "started")
        pids.extend(int(p) for p in os.listdir("/proc") if p.isdigit()
                    and str(tmp_path).encode() in _proc_text(p, "cmdline"))
        raise RuntimeError("could not open the snapshot")

    with pytest.raises(RuntimeError, match="could not open the snapshot"):
        process.pipeline([make, Stage((PY, "-c", CONSUMER, str(tmp_path)))], timeout=60)
    assert pids  # the consumer (and its setpriv wrapper, if any) was found running
    for pid in pids:  # gone (b"") or a zombie
        stat = _proc_text(str(pid), "stat")
        assert not stat or stat.split(b") ")[1].startswith(b"Z")
    assert not (tmp_path / "eof").exists()  # killed, never a clean end-of-stream


def test_only_the_first_stage_may_be_a_factory():
    with pytest.raises(ValueError, match="first stage"):
        process.pipeline([Stage(("true",)), lambda: Stage(("true",))], timeout=5)
    with pytest.raises(ValueError, match="first stage"):
        process.pipeline([lambda: Stage(("true",))], timeout=5)


def test_a_failing_factory_made_first_stage_raises_a_pipeline_error_naming_its_command(
        tmp_path):
    def make() -> Stage:
        return Stage((PY, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"))

    with pytest.raises(PipelineError) as err:
        process.pipeline([make, Stage((PY, "-c", CONSUMER, str(tmp_path)))], timeout=60,
                         check=True)
    assert f"pipeline failed at stage 1 ({PY})" in str(err.value)
    assert not (tmp_path / "eof").exists()  # the consumer never saw a clean end of stream
