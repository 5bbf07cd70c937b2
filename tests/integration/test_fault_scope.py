"""The fault injectors' process scan (tests/fixtures/procs.py) sees only this test
session's processes: two sessions on one machine must never kill each other's."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid

from tests.fixtures.procs import adopt, is_own, process_argvs
from tests.fixtures.waiting import wait_until

PY = sys.executable
SLEEPER = "import time; time.sleep(300)"


def _with_marker(marker: str, *, own: bool) -> set[int]:
    return {pid for pid, argv in process_argvs(own=own) if marker.encode() in argv}


def test_a_scan_for_this_sessions_processes_skips_another_sessions_and_takes_adopted_ones():
    marker = f"lk-scope-{uuid.uuid4().hex}"
    child = subprocess.Popen((PY, "-c", SLEEPER, marker), start_new_session=True)
    # detached (its parent exits): what another session's process looks like from here,
    # and what a daemon this session starts looks like before it is adopted
    out = subprocess.run(("sh", "-c", '"$0" -c "$1" "$2" >/dev/null 2>&1 & echo $!',
                          PY, SLEEPER, marker), capture_output=True, text=True, check=True,
                         timeout=60)
    stranger = int(out.stdout)
    try:
        wait_until(lambda: _with_marker(marker, own=False) == {child.pid, stranger},
                   timeout=60, what="both processes to run")
        assert _with_marker(marker, own=True) == {child.pid}
        assert is_own(child.pid) and not is_own(stranger)
        undo = adopt(lambda: [stranger])
        try:
            assert _with_marker(marker, own=True) == {child.pid, stranger}
            assert is_own(stranger)
        finally:
            undo()
        assert _with_marker(marker, own=True) == {child.pid}
    finally:
        child.kill()
        child.wait(30)
        with contextlib.suppress(ProcessLookupError):
            os.kill(stranger, signal.SIGKILL)
