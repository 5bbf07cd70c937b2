"""The runner's threads call back in the caller's context: a callback that logs (a
progress line, a stderr line) keeps the flow run it belongs to (labkeeper/log_setup.py)."""

from __future__ import annotations

import contextvars
import sys

from labkeeper import process

PY = sys.executable
_RUN = contextvars.ContextVar("run", default="none")


def test_a_pipelines_byte_and_line_callbacks_run_in_the_callers_context():
    seen: dict[str, set[str]] = {"bytes": set(), "stderr": set(), "stdout": set()}
    producer = process.Stage(
        (PY, "-c", "import sys; sys.stderr.write('warm\\n'); sys.stdout.write('y' * 100000)"),
        on_bytes=lambda _n: seen["bytes"].add(_RUN.get()),
        on_stderr_line=lambda _line: seen["stderr"].add(_RUN.get()))
    token = _RUN.set("the caller's run")
    try:
        res = process.pipeline([producer, ("wc", "-c")], timeout=30,
                               on_stdout_line=lambda _line: seen["stdout"].add(_RUN.get()))
    finally:
        _RUN.reset(token)
    assert res.stdout.strip() == "100000"
    assert seen == {"bytes": {"the caller's run"}, "stderr": {"the caller's run"},
                    "stdout": {"the caller's run"}}


def test_a_commands_line_callbacks_run_in_the_callers_context():
    seen: list[str] = []
    token = _RUN.set("the caller's run")
    try:
        process.run((PY, "-c", "import sys; print('out'); print('err', file=sys.stderr)"),
                    timeout=30, on_stdout_line=lambda _l: seen.append(_RUN.get()),
                    on_stderr_line=lambda _l: seen.append(_RUN.get()))
    finally:
        _RUN.reset(token)
    assert seen == ["the caller's run", "the caller's run"]
