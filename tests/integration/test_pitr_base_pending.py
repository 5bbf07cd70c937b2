"""Base backups leave a pending-cleanup record while they run (PostgreSQL 15, restic,
moto S3): a base backup whose pg_basebackup is killed cleans up and clears its record;
one whose whole run is killed mid-stream leaves the record, nothing counted, and the
next base backup forgets whatever that attempt left (a partial snapshot) first."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkeeper import restic
from labkeeper.pitr import PitrError, basebackup, models
from labkeeper.pitr.target import PitrTarget, complete_bases, list_server
from tests.fixtures.procs import parent_pid, process_argvs
from tests.integration.pitr_support import PitrLab, Receiver, start_pitr_lab, wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import dataclasses, sys
from labkeeper.inventory import load_inventory
from labkeeper.pitr import basebackup, target
t = target.resolve(load_inventory(sys.argv[1]), "pg1")
slow = dataclasses.replace(t, server=t.server.model_copy(update={"max_rate_kb": 256}))
basebackup.run_base_backup(slow)
"""


@dataclasses.dataclass
class Lab:
    plab: PitrLab
    receiver: Receiver


@pytest.fixture(scope="module")
def plab() -> Iterator[Lab]:
    workdir = Path(tempfile.mkdtemp(prefix="labkeeper-pitr-pending-"))
    p = start_pitr_lab(workdir)
    receiver = Receiver(p).start()
    try:
        yield Lab(p, receiver)
    finally:
        receiver.stop()
        p.lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _children(parent: int, name: bytes) -> list[int]:
    return [pid for pid, argv in process_argvs()
            if argv and argv[0].endswith(name) and parent_pid(pid) == parent]


def _stream_restics(parent: int) -> list[int]:
    """The job's ``restic backup`` (not a listing it ran before the stream)."""
    return [pid for pid, argv in process_argvs()
            if argv and argv[0].endswith(b"restic") and b"backup" in argv
            and parent_pid(pid) == parent]


def _pending(t: PitrTarget) -> list[str]:
    store = basebackup.pending_store(t)
    assert store is not None
    return [a.backup_id for a in store.read()]


def _attempt_snapshots(t: PitrTarget, backup_id: str) -> list[restic.Snapshot]:
    return [s for s in list_server(t) if f"backup:{backup_id}" in s.tags]


def test_a_killed_pg_basebackup_is_cleaned_up_and_its_record_cleared(plab: Lab) -> None:
    t = plab.plab.target()
    slow = dataclasses.replace(t, server=t.server.model_copy(update={"max_rate_kb": 256}))
    errors: list[BaseException] = []
    recorded: list[list[str]] = []

    def run() -> None:
        try:
            basebackup.run_base_backup(slow)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    pgbb = wait_until(lambda: _children(os.getpid(), b"pg_basebackup"), 60,
                      "pg_basebackup to start")
    wait_until(lambda: _children(os.getpid(), b"restic"), 60, "restic to read the stream")
    recorded.append(_pending(t))  # recorded while the stream runs
    for pid in pgbb:  # type: ignore[union-attr]
        os.kill(pid, signal.SIGKILL)
    th.join(180)
    assert errors and isinstance(errors[0], PitrError), errors
    assert len(recorded[0]) == 1, recorded
    assert _pending(t) == [], "a cleaned-up attempt stayed recorded"
    assert not _attempt_snapshots(t, recorded[0][0])
    assert not complete_bases(list_server(t))


def test_a_run_killed_mid_stream_leaves_a_record_and_the_next_run_sweeps_it(
        plab: Lab) -> None:
    t = plab.plab.target()
    lab_file = str(plab.plab.workdir / "lab.yaml")
    child = subprocess.Popen([sys.executable, "-c", CHILD, lab_file], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pgbb = wait_until(lambda: _children(child.pid, b"pg_basebackup"), 90,
                          "the job's pg_basebackup to start")
        restics = wait_until(lambda: _stream_restics(child.pid), 60,
                             "the job's restic backup to read")
        [attempt] = _pending(t)
        os.kill(child.pid, signal.SIGKILL)  # the whole job dies mid-stream ...
        for pid in pgbb:  # type: ignore[union-attr]
            os.kill(pid, signal.SIGKILL)  # ... and its pg_basebackup with it
    finally:
        child.kill()
        child.wait(60)
    # the job's restic outlives it (reparented) and may still save what it was given:
    # it must be gone before the next run, or its snapshot lands after the sweep; and
    # reaped (a zombie's pid still answers, so restic would not call its lock stale)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}")
                               for pid in restics),  # type: ignore[union-attr]
               120, "the job's restic to end and be reaped")
    assert _pending(t) == [attempt], "the killed attempt is not recorded"
    assert not complete_bases(list_server(t)), "a killed base backup counts"
    # what a restic that got end-of-stream from a dying job would have left: a partial
    # tar under the attempt's tags
    restic.backup_bytes(t.repo, b"partial", filename=models.base_filename(t.name),
                        host=t.host, tags=[*models.base_tags(t.name), f"backup:{attempt}"])
    assert _attempt_snapshots(t, attempt)

    res = basebackup.run_base_backup(t)
    assert not _attempt_snapshots(t, attempt), "the partial snapshot was not forgotten"
    assert _pending(t) == []
    assert [b.backup_id for b in complete_bases(list_server(t))] == [res.backup_id]
    assert any(attempt in n and "forgot snapshot" in n for n in res.notes), res.notes
    store = basebackup.pending_store(t)
    assert store is not None and not store.path.exists()
    json.dumps(res.row())  # the row a flow reports is plain JSON
