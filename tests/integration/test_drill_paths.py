"""Path-set DR drills against the real local lab: restic backs the sets up on the "host"
(the lab's sshd, root on this machine) into our own moto bucket; the drill restores a
random sample with ``restic dump`` and compares SHA-256 with the files over SSH."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import pytest

from flows.dr_drill import dr_drill_flow
from labkeeper import drill, drill_paths, path_backup
from labkeeper.inventory import Inventory
from tests.integration.test_doctor_flow import _flow_run_record
from tests.integration.test_drill_support import load
from tests.integration.test_pg_backup import _events

pytestmark = pytest.mark.integration

TRICKY = "a b's \"q\" $HOME *;.bin"
SETS = ("good", "changes", "rot", "never")


def _tree(root: Path) -> dict[str, bytes]:
    """A small tree with names a shell would mangle; returns {relative path: content}."""
    files = {
        "plain.txt": b"hello\n" * 100,
        f"sub/{TRICKY}": os.urandom(3000),
        "sub/-dash.txt": b"not an option\n",
        "nl\nname.txt": b"a newline in the name\n",
        "big.bin": os.urandom(2 << 20),
        "changed.txt": b"version 1\n",
        "deleted.txt": b"soon gone\n",
        "rot.txt": b"0123456789" * 50,
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    os.symlink("plain.txt", root / "link")  # a symlink node: never sampled as a file
    return files


@pytest.fixture(scope="module")
def paths_env(drill_env, tmp_path_factory) -> tuple[Path, dict[str, Path], int]:
    """Bucket ``drill-paths`` with one backup of each set but ``never``.
    Returns (inventory path, set name → tree root, files per tree)."""
    e = drill_env
    _repo, pw = e.new_repo("drill-paths")
    base = tmp_path_factory.mktemp("drill-paths-src")
    roots = {}
    count = 0
    for name in SETS:
        roots[name] = base / name
        count = len(_tree(roots[name]))
    sets = [{"name": n, "host": "labhost", "paths": [str(roots[n])], "progress_interval": 5}
            for n in SETS]
    path = e.inventory("drill-paths", pw, databases=[{"name": "appdb"}],
                       drills={"repository": {"enabled": False},
                               "paths": {"sample_files": 50, "rpo_hours": 1}},
                       extra={"path_backups": sets})
    inv = load(path)
    for name in SETS[:-1]:
        path_backup.backup_path_set(inv, name)
    return path, roots, count


def _inv(paths_env, **paths_settings) -> Inventory:
    inv = load(paths_env[0])
    return inv.model_copy(update={"drills": inv.drills.model_copy(update={
        "paths": inv.drills.paths.model_copy(update=paths_settings)})})


def _files(result: drill.DrillResult) -> dict[str, drill.Check]:
    return {c.name.removeprefix("file "): c for c in result.checks if c.name.startswith("file ")}


def test_every_sampled_file_restores_identical_to_the_host_and_the_drill_passes(paths_env,
                                                                                 caplog):
    _path, roots, count = paths_env
    caplog.set_level(logging.INFO, logger="labkeeper")
    result = drill_paths.paths_drill(_inv(paths_env), "labhost/good")
    logs = caplog.messages
    assert result.passed, result.summary()
    assert result.kind == "paths" and result.target == "labhost/good"
    assert result.label == "paths:labhost/good"
    files = _files(result)
    root = str(roots["good"])
    assert set(files) == {f"{root}/{rel}" for rel in (
        "plain.txt", f"sub/{TRICKY}", "sub/-dash.txt", "nl\nname.txt", "big.bin",
        "changed.txt", "deleted.txt", "rot.txt")}
    assert len(files) == count
    assert all(c.ok and c.detail.startswith("identical on the host (") for c in files.values())
    assert files[f"{root}/big.bin"].detail.startswith(f"identical on the host ({2 << 20} bytes")
    checks = {c.name: c for c in result.checks}
    assert checks["sample"].detail.startswith(f"{count} of {count} file(s) of ")
    assert checks["rpo"].ok and 0 < result.rpo_s < 3600
    assert f"sample: {count} identical" in result.notes[0]
    assert any("PASSED" in line for line in logs)


def test_files_changed_or_deleted_on_the_host_since_the_backup_are_reported_not_failed(
        paths_env):
    _path, roots, _count = paths_env
    root = roots["changes"]
    (root / "changed.txt").write_bytes(b"version 2, longer\n")
    (root / "deleted.txt").unlink()
    result = drill_paths.paths_drill(_inv(paths_env), "changes")
    assert result.passed, result.summary()
    files = _files(result)
    changed = files[f"{root}/changed.txt"]
    assert changed.ok and changed.detail.startswith(
        "changed on the host since the backup: size 18 (recorded 10)")
    assert files[f"{root}/deleted.txt"].detail.startswith("deleted on the host since the backup")
    assert files[f"{root}/plain.txt"].detail.startswith("identical")
    assert "1 changed" in result.notes[0] and "1 deleted" in result.notes[0]


def test_a_different_content_in_a_file_unchanged_since_the_backup_fails_the_drill(paths_env):
    _path, roots, _count = paths_env
    rot = roots["rot"] / "rot.txt"
    st = rot.stat()
    data = bytearray(rot.read_bytes())
    data[100] ^= 0x01  # one flipped bit, same size, mtime put back: bit rot
    rot.write_bytes(bytes(data))
    os.utime(rot, ns=(st.st_atime_ns, st.st_mtime_ns))
    result = drill_paths.paths_drill(_inv(paths_env), "labhost/rot")
    assert not result.passed
    failed = {c.name: c.detail for c in result.failed_checks}
    assert list(failed) == [f"file {rot}"]
    assert failed[f"file {rot}"].startswith("CONTENT DIFFERS from the host although size (500)")
    assert "rewritten with its mtime kept?" in failed[f"file {rot}"]  # its ctime moved
    assert "CONTENT DIFFERS" in result.summary()


def test_a_random_sample_leaves_out_large_files_and_says_so(paths_env):
    inv = _inv(paths_env, sample_files=3, max_file_mb=1)
    result = drill_paths.paths_drill(inv, "labhost/good", rng=random.Random(7))
    assert result.passed, result.summary()
    files = _files(result)
    assert len(files) == 3 and not any(p.endswith("big.bin") for p in files)
    assert "1 file(s) larger than 1 MiB left out of the sample" in result.notes


def test_a_path_set_never_backed_up_or_too_old_fails_loudly(paths_env):
    never = drill_paths.paths_drill(_inv(paths_env), "labhost/never")
    assert not never.passed
    assert never.error.startswith("no snapshot of paths:labhost/never in repository lab-repo")
    stale = drill_paths.paths_drill(_inv(paths_env, rpo_hours=0.00001, sample_files=1),
                                    "labhost/good")
    assert not stale.passed and stale.rpo_breached
    assert {c.name for c in stale.failed_checks} == {"rpo"}


def test_all_includes_the_path_sets_and_the_flow_records_each_as_paths(paths_env,
                                                                       prefect_harness):
    path, _roots, _count = paths_env
    assert [t for t in drill.plan_targets(load(path), "all") if t[0] == "paths"] == [
        ("paths", f"labhost/{n}") for n in SETS]
    state = dr_drill_flow(target="paths:labhost/good", lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert (row["drill"], row["target"], row["status"]) == ("paths", "labhost/good", "passed")
    _run, _logs, arts = _flow_run_record(state)
    table = next(a for a in arts if a.key == "drill-paths-labhost-good")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert data[0]["status"] == "passed" and data[0]["rpo objective"] == "60.0 min"
    md = next(a for a in arts if a.key == "dr-drill")
    assert "✅ file " in md.data and "identical on the host" in md.data
    events = _events("labkeeper.drill.passed", "labkeeper.paths.labhost/good")
    assert events and events[0]["payload"]["drill"] == "paths"
