"""restic's backend retries reach the run log while restic runs (real restic, a local
repository whose lock list names a lock file that cannot be loaded, the way a lock
that vanished under restic looks).

restic 0.14 retries loading it in its backend for 45-95 s (``Load(<lock/…>, 0, 0)
returned error, retrying after …``); restic 0.17+ does not retry a missing file in the
backend: it says ``Load(<lock/…>, 0, 0) failed: …`` and its lock check tries again
after 5, 15 and 35 s, then fails with "unable to create lock in backend" (exit 1; a
lock failure, transient: see tests/unit/test_restic_versions.py). Either line becomes
a run-log note; each test runs on both versions (restic matrix) and expects the
note the version prints."""

from __future__ import annotations

import os
import signal
import threading
import uuid
from pathlib import Path

import pytest
from pydantic import SecretStr

from labkeeper import process, restic
from tests.fixtures.procs import restic_pids

GHOST = "1" * 64


def expected_note(binary: str) -> str:
    """How the note on the ghost lock starts with this restic."""
    call = f"Load(<lock/{GHOST[:10]}>, 0, 0)"
    if restic.version_info(binary) >= restic.ResticVersion(0, 17, 0):
        return f"restic could not {call}: "
    return f"restic is retrying {call} after "


@pytest.fixture
def ghost_locked_repo(tmp_path: Path) -> restic.Repo:
    repo = restic.Repo(url=str(tmp_path / "repo"), password=SecretStr("retry-test-pw"))
    restic.init(repo)
    (tmp_path / "repo" / "locks" / GHOST).symlink_to(tmp_path / "nowhere")
    return repo


class Notes:
    """Collects :func:`restic.backend_retry` notes from restic's stderr lines."""

    def __init__(self) -> None:
        self.notes: list[str] = []
        self.first = threading.Event()

    def __call__(self, line: str) -> None:
        note = restic.backend_retry(line)
        if note is not None:
            self.notes.append(note)
            self.first.set()


@pytest.mark.restic_matrix
def test_waiting_backup_hands_restics_lock_retries_to_its_stderr_callback(ghost_locked_repo,
                                                                          restic_bin):
    said = Notes()
    pending = restic.PendingBackup(ghost_locked_repo, filename="m.json", host="h",
                                   tags=["labkeeper"], on_stderr_line=said)
    try:
        assert said.first.wait(30), "restic printed no retry"
    finally:
        pending.abort()
    assert said.notes[0].startswith(expected_note(restic_bin)), said.notes
    assert "no such file or directory" in said.notes[0]


@pytest.mark.restic_matrix
def test_streamed_backup_hands_restics_lock_retries_to_its_stderr_callback(ghost_locked_repo,
                                                                           restic_bin):
    said = Notes()
    filename = f"retry-{uuid.uuid4().hex}.bin"

    def stop_restic_after_the_first_retry() -> None:
        said.first.wait(30)
        for pid in restic_pids(filename.encode()):
            os.kill(pid, signal.SIGKILL)

    stopper = threading.Thread(target=stop_restic_after_the_first_retry, daemon=True)
    stopper.start()
    with pytest.raises(restic.StreamFailed):
        restic.stream_backup(ghost_locked_repo, process.Stage(("printf", "data")),
                             filename=filename, host="h", tags=["labkeeper"],
                             gate=lambda tail, n: None, timeout=60, on_stderr_line=said)
    said.first.set()
    stopper.join(5)
    assert said.notes and said.notes[0].startswith(expected_note(restic_bin)), said.notes
    assert "no such file or directory" in said.notes[0]
