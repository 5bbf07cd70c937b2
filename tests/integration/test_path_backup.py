"""File backups with restic running on the "host" over SSH, against the real local lab:
the lab's sshd (root on this machine) is the host, moto's S3 holds the repository.

Source trees are generated under pytest's tmp dirs only. The unreadable file: root
reads ``chmod 000`` files anyway, so the tree holds a directory chain deeper than
PATH_MAX (4096 bytes): restic lstat()s entries by full path and gets ENAMETOOLONG,
reports a JSON ``error`` message and exits 3 (see labkeeper/path_backup.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from flows.path_backup import path_backup_flow
from labkeeper import b2, path_backup, restic
from labkeeper.errors import SSHConnectError
from labkeeper.inventory import load_inventory
from labkeeper.ssh import connect
from tasks import path_backup as path_tasks
from tests.fixtures.procs import io_bytes, own_roots, process_argvs, restic_pids
from tests.integration.test_doctor_flow import ArgvWatcher, _flow_run_record

SMALL_FILES = 2000
SMALL_DIRS = 24
LARGE = (3 << 20, 4 << 20, 6 << 20)  # a few large files of random (incompressible) data
DROP_FILES = (32 << 20, 32 << 20)  # the SSH-drop tree: big enough to take a few seconds


# -- the generated trees -------------------------------------------------------------------

def make_unreadable(parent: Path) -> Path:
    """A file below a directory chain longer than PATH_MAX: unreadable even for root.
    Returns the first path restic cannot lstat."""
    base = parent / "too-deep"
    base.mkdir()
    fd = os.open(base, os.O_RDONLY)
    name = "d" * 200
    path = str(base)
    try:
        while len(path) + 1 + len(name) <= 4096:
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            path += "/" + name
        os.mkdir(name, dir_fd=fd)  # its full path is > 4096 bytes
        nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
        f = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=nfd)
        os.write(f, b"you cannot back me up\n")
        os.close(f)
        os.close(nfd)
    finally:
        os.close(fd)
    return Path(path + "/" + name)


def make_tree(root: Path, *, seed: int = 1) -> dict[str, int]:
    """Thousands of small files, a few large ones, a symlink loop, an unreadable path."""
    rnd = __import__("random").Random(seed)
    root.mkdir(parents=True)
    total = 0
    for d in range(SMALL_DIRS):
        sub = root / "small" / f"dir{d:02d}"
        sub.mkdir(parents=True)
        for i in range(SMALL_FILES // SMALL_DIRS):
            data = rnd.randbytes(rnd.randint(200, 3000))
            (sub / f"f{i:04d}.bin").write_bytes(data)
            total += len(data)
    (root / "large").mkdir()
    for i, size in enumerate(LARGE):
        (root / "large" / f"big{i}.bin").write_bytes(os.urandom(size))
        total += size
    (root / "loop").mkdir()
    os.symlink("b", root / "loop" / "a")
    os.symlink("a", root / "loop" / "b")
    os.symlink(".", root / "loop" / "self")
    (root / "cache").mkdir()  # --exclude-caches drops it
    (root / "cache" / "CACHEDIR.TAG").write_text(
        "Signature: 8a477f597d28d172789f06886806bc55\n")
    (root / "cache" / "junk.bin").write_bytes(os.urandom(100_000))
    return {"files": SMALL_FILES // SMALL_DIRS * SMALL_DIRS + len(LARGE), "bytes": total}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("pathsrc")
    files = base / "files"
    info = make_tree(files)
    unreadable = make_unreadable(files)
    clean = base / "clean"
    clean.mkdir()
    (clean / "a.txt").write_text("hello\n")
    drop = base / "drop"
    drop.mkdir()
    for i, size in enumerate(DROP_FILES):
        (drop / f"blob{i}.bin").write_bytes(os.urandom(size))
    return {"files": files, "info": info, "unreadable": unreadable, "clean": clean,
            "drop": drop, "base": base}


@pytest.fixture(scope="module")
def inv_path(lab, trees, tmp_path_factory) -> Path:
    inv = yaml.safe_load(lab.inventory_path.read_text())
    common = {"host": "labhost", "progress_interval": 1}
    inv["path_backups"] = [
        {"name": "files", "paths": [str(trees["files"])], "excludes": ["*.tmp"], **common},
        {"name": "clean", "paths": [str(trees["clean"])], **common},
        {"name": "drop", "paths": [str(trees["drop"])], **common},
        {"name": "missing", "paths": [str(trees["base"] / "does-not-exist")], **common},
        {"name": "norestic", "paths": [str(trees["clean"])],
         "restic_binary": "/opt/nowhere/restic", **common},
        # pending cleanups: "late" does not exist until its first attempt has failed
        {"name": "late", "paths": [str(trees["base"] / "late")], **common},
        {"name": "stuck", "paths": [str(trees["clean"])], **common},
        {"name": "contended", "paths": [str(trees["clean"])], **common},
    ]
    path = tmp_path_factory.mktemp("pathinv") / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _repo(path: Path) -> restic.Repo:
    inv = load_inventory(path)
    return path_backup.open_repo(inv, inv.path_backup("files"))


def _series(repo: restic.Repo, name: str) -> list[restic.Snapshot]:
    return restic.find_snapshots(repo, tags=path_backup.series_tags("labhost", name),
                                 host="local-lab")


def _bucket_bytes(lab) -> int:
    return b2.bucket_usage(lab.s3.target(), prefix="restic/")[1]


def _secrets(lab) -> list[str]:
    values = [lab.secrets_dir.joinpath(n).read_text().strip()
              for n in ("restic-password", "s3-access-key-id", "s3-secret-access-key")]
    assert all(values)
    return values


# -- first backup through the flow: tags, summary, progress, warning, no secret in argv ------

def test_first_backup_runs_restic_on_the_host_and_reports_unreadable_paths_as_a_warning(
        lab, inv_path, trees, prefect_harness):
    repo = _repo(inv_path)
    secrets = _secrets(lab)
    with ArgvWatcher() as watcher:
        state = path_backup_flow(lab=str(inv_path), names=["files"], return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["status"] == "warning" and row["unreadable"] == 1
    # every generated file + CACHEDIR.TAG (kept; the rest of its dir is excluded); not
    # the unreadable leaf
    assert row["files"] == trees["info"]["files"] + 1, row

    snaps = _series(repo, "files")
    assert len(snaps) == 1
    snap = snaps[0]
    assert snap.hostname == "local-lab" and snap.paths == [str(trees["files"])]
    assert {"labkeeper", "paths:labhost/files", "kind:paths"} <= set(snap.tags)
    assert f"backup:{row['backup id']}" in snap.tags
    nodes = {n.path: n for n in restic.ls(repo, snap.id)}
    root = str(trees["files"])
    assert nodes[f"{root}/loop/a"].type == "symlink"  # the loop is stored, not followed
    assert f"{root}/large/big2.bin" in nodes and nodes[f"{root}/large/big2.bin"].size == LARGE[2]
    assert f"{root}/cache/junk.bin" not in nodes  # CACHEDIR.TAG honoured

    run, logs, arts = _flow_run_record(state)
    text = "\n".join(log.message for log in logs)
    assert "files@labhost: 0.0%" in text and "files@labhost: 100.0%" in text  # progress
    assert f"{row['files']} of {row['files']} files" in text
    assert "restic 0.14" in text and "INCOMPLETE" in text
    summary = next(a for a in arts if a.key == "path-backup-summary")
    assert '"total_files_processed"' in summary.data and '"snapshot_id"' in summary.data
    assert "File name too long" in summary.data and "too-deep" in summary.data
    table = next(a for a in arts if a.key == "path-backup")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert data[0]["path set"] == "labhost/files" and data[0]["status"] == "warning"

    # the remote restic really ran through the SSH preamble, with no secret in any argv
    restics = [c for c in watcher.seen if b"kind:paths" in c and b"restic" in c]
    assert restics, "the watcher missed the remote restic"
    assert any(b"labkeeper-env" in c for c in restics)
    haystacks = {"parameters": repr(run.parameters), "logs": text,
                 "artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in arts)}
    for secret in secrets:
        for where, hay in haystacks.items():
            assert secret not in hay, f"a lab secret leaked into the {where}"
        for cmdline in watcher.seen:
            assert secret.encode() not in cmdline, "a lab secret leaked into a process's argv"


def test_second_backup_with_a_few_changes_adds_about_the_changed_bytes(lab, inv_path, trees):
    inv = load_inventory(inv_path)
    files = trees["files"]
    if not _series(_repo(inv_path), "files"):  # baseline (when run alone)
        path_backup.backup_path_set(inv, "files")
    changed = os.urandom(2 << 20)
    (files / "large" / "new.bin").write_bytes(changed)
    small = sorted((files / "small" / "dir03").iterdir())[:5]
    for p in small:
        p.write_bytes(os.urandom(1500))
    small[-1].unlink()
    changed_bytes = len(changed) + 4 * 1500
    before = _bucket_bytes(lab)
    res = path_backup.backup_path_set(inv, "files")
    grown = _bucket_bytes(lab) - before
    assert res.files_new == 1 and res.files_changed == 4
    # dedup: only the changed data (+ a tree, index and snapshot file) was uploaded
    assert changed_bytes <= grown <= changed_bytes + 256 * 1024, (grown, changed_bytes)


def test_restic_missing_on_the_host_is_a_clear_error_naming_host_and_install(inv_path):
    with pytest.raises(path_backup.ResticMissing) as err:
        path_backup.backup_path_set(load_inventory(inv_path), "norestic")
    msg = str(err.value)
    assert "not installed on labhost" in msg and "apt-get install restic" in msg
    assert not err.value.transient


def test_paths_missing_on_the_host_fail_permanently_and_leave_no_snapshot(inv_path):
    repo = _repo(inv_path)
    with pytest.raises(path_backup.PathBackupFailed) as err:
        path_backup.backup_path_set(load_inventory(inv_path), "missing")
    assert not err.value.transient and "do not exist" in str(err.value)
    assert _series(repo, "missing") == []


# -- stale lock, SSH dropped mid-backup ---------------------------------------------------------

def test_stale_lock_of_a_killed_restic_is_removed_and_a_clean_tree_backs_up_ok(inv_path,
                                                                               caplog):
    repo = _repo(inv_path)
    proc = subprocess.Popen((*repo.base_argv(), "backup", "--stdin", "--host", "x"),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **repo.env()})
    deadline = time.monotonic() + 30
    while not [lk for lk in restic.list_locks(repo) if lk.pid == proc.pid]:
        assert time.monotonic() < deadline, "the lock never appeared"
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    caplog.set_level(logging.INFO, logger="labkeeper")
    res = path_backup.backup_path_set(load_inventory(inv_path), "clean")
    notes = caplog.messages
    assert res.status == "ok" and res.files == 1 and res.unreadable_count == 0  # exit 0
    assert any("removed stale" in n and str(proc.pid) in n for n in notes), notes
    assert not [lk for lk in restic.list_locks(repo) if lk.pid == proc.pid]


def _ppid_comm(pid: int) -> tuple[int, str]:
    """(parent pid, own command name) of ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    comm = text[text.index("(") + 1:text.rindex(")")]
    return int(text.rsplit(")", 1)[1].split()[1]), comm


def _is_drop_restic(argv: list[bytes]) -> bool:
    return argv[0].endswith(b"restic") and b"paths:labhost/drop" in argv


class SessionKiller(threading.Thread):
    """Waits for a remote command of this session whose argv ``match`` matches (default:
    the restic of path set ``drop``), lets it read ``min_read`` bytes (mid-stream however
    fast or slow the machine is), then SIGKILLs the sshd session process above it: the
    SSH connection drops mid-command. (If the command ended meanwhile it looks for the
    next one.)"""

    def __init__(self, min_read: int = 0,
                 match: Callable[[list[bytes]], bool] = _is_drop_restic) -> None:
        super().__init__(daemon=True)
        self.min_read = min_read
        self.match = match
        self.found_pid = 0
        self.killed_sshd = 0
        self.stop = threading.Event()

    def _find(self) -> int:
        # own: another test session's restic of a "drop" set is not ours to cut off
        return next((pid for pid, argv in process_argvs(own=True) if self.match(argv)), 0)

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed_sshd:
            pid = self._find()
            if not pid:
                time.sleep(0.02)
                continue
            self.found_pid = pid
            try:
                while io_bytes(pid, "rchar") < self.min_read and not self.stop.is_set():
                    time.sleep(0.005)
                listeners = own_roots()  # the lab's sshd itself: never
                while pid > 1 and pid not in listeners:
                    parent, comm = _ppid_comm(pid)
                    if comm == "sshd":  # the session's "sshd: root@notty", not the listener
                        os.kill(pid, signal.SIGKILL)
                        self.killed_sshd = pid
                        return
                    pid = parent
            except OSError:
                continue  # it ended before we got there: wait for the next one


def test_ssh_dropped_mid_backup_fails_cleans_up_then_the_retry_succeeds(
        lab, inv_path, prefect_harness, monkeypatch):
    monkeypatch.setattr(path_tasks, "backup_path_set",
                        path_tasks.backup_path_set.with_options(retries=1,
                                                                retry_delay_seconds=0))
    repo = _repo(inv_path)
    killer = SessionKiller(min_read=8 << 20)  # of DROP_FILES' 64 MiB
    killer.start()
    state = path_backup_flow(lab=str(inv_path), names=["drop"], return_state=True)
    killer.stop.set()
    killer.join(5)
    assert killer.killed_sshd, "the SSH session was never killed"
    assert state.is_completed(), state.message
    (row,) = state.result()
    assert row["status"] == "ok" and row["bytes"] == sum(DROP_FILES)

    _run, logs, _arts = _flow_run_record(state)
    text = "\n".join(log.message for log in logs)
    assert "SSH connection to labhost was lost" in text, text[-3000:]
    assert "ran `restic unlock` on labhost" in text
    # the dropped attempt's restic is gone (SIGPIPE or our SIGTERM), nothing of it kept
    assert not os.path.exists(f"/proc/{killer.found_pid}")
    snaps = _series(repo, "drop")
    assert len(snaps) == 1 and f"backup:{row['backup id']}" in snaps[0].tags
    assert [lk for lk in restic.list_locks(repo)] == []


# -- cleanup that could not finish: recorded, swept by the next backup ----------------------------

def _pending(inv, name: str) -> path_backup.PendingCleanups:
    return path_backup.PendingCleanups(inv.settings.state_dir, inv.path_backup(name).host, name)


def _pending_ids(store: path_backup.PendingCleanups) -> list[str]:
    return [a.backup_id for a in store.read()]


def _tag_args(tags: list[str]) -> list[str]:
    return [arg for t in tags for arg in ("--tag", t)]


def _plant_snapshot(repo: restic.Repo, src: Path, *, host: str, tags: list[str]) -> str:
    """What a restic of a lost attempt leaves when it finishes on the host after all:
    a complete snapshot with the series tags and the attempt's tag."""
    subprocess.run((*repo.base_argv(), "backup", "--host", host, *_tag_args(tags), str(src)),
                   env={**os.environ, **repo.env()}, check=True, capture_output=True,
                   timeout=120)
    (snap,) = restic.find_snapshots(repo, tags=tags, host=host)
    return snap.id


def _running_restic(repo: restic.Repo, *, host: str, tags: list[str]) -> subprocess.Popen:
    """A restic that holds its (non-exclusive) lock until stdin closes or it is killed;
    reaped at once when it ends (a zombie would still count as alive for restic's
    stale-lock check)."""
    proc = subprocess.Popen((*repo.base_argv(), "backup", "--stdin", "--host", host,
                             *_tag_args(tags)),
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **repo.env()})
    threading.Thread(target=proc.wait, daemon=True).start()
    deadline = time.monotonic() + 30
    while not [lk for lk in restic.list_locks(repo) if lk.pid == proc.pid]:
        assert time.monotonic() < deadline, "the lock never appeared"
        time.sleep(0.2)
    return proc


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


def test_unreachable_cleanup_is_recorded_and_the_next_backup_stops_and_forgets_the_attempt(
        inv_path, trees, caplog):
    inv = load_inventory(inv_path)
    repo = _repo(inv_path)
    store = _pending(inv, "late")
    connections: list[str] = []

    def host_goes_away(target):
        """The backup's own connection works; the cleanup's fresh one finds the host gone."""
        connections.append(target.name)
        if len(connections) > 1:
            raise SSHConnectError(f"ssh {target.name}: connection refused (test: host gone)")
        return connect(target)

    # 1. the attempt fails (its paths are not there yet) and its cleanup cannot reach the host
    with pytest.raises(path_backup.PathBackupFailed) as err:
        path_backup.backup_path_set(inv, "late", connector=host_goes_away)
    backup_id = err.value.backup_id
    tag = path_backup.backup_tag(backup_id)
    assert len(connections) == 2
    assert "could not reach labhost" in str(err.value)
    assert f"recorded attempt {backup_id} as pending cleanup in {store.path}" in str(err.value)
    assert _pending_ids(store) == [backup_id]
    assert store.read()[0].snapshot_host == inv.lab.name

    # 2. meanwhile on the host: one restic of that attempt finished after all (a complete
    # snapshot counted in the series), another one still runs and holds its lock
    src = trees["base"] / "late"
    src.mkdir()
    (src / "photo.jpg").write_bytes(os.urandom(50_000))
    tags = [*path_backup.series_tags("labhost", "late"), tag]
    late = _plant_snapshot(repo, src, host=inv.lab.name, tags=tags)
    still = _running_restic(repo, host=inv.lab.name, tags=tags)
    try:
        assert [s.id for s in _series(repo, "late")] == [late]

        # 3. the next backup sweeps the attempt first, then backs up
        caplog.set_level(logging.INFO, logger="labkeeper")
        caplog.clear()
        res = path_backup.backup_path_set(inv, "late", stop_grace=1)
    finally:
        _end(still)
    assert res.status == "ok" and res.files == 1
    assert still.returncode == -signal.SIGTERM  # stopped by the sweep, not by us
    assert [s.id for s in _series(repo, "late")] == [res.snapshot_id]  # the late one forgotten
    assert restic.find_snapshots(repo, tags=[tag]) == []
    assert not [lk for lk in restic.list_locks(repo) if lk.pid == still.pid]
    assert not store.path.exists()
    notes = res.row()["notes"]  # what reaches the artifact
    assert f"swept earlier failed attempt {backup_id}" in notes
    assert f"sent SIGTERM to the attempt's remote process(es) {still.pid}" in notes
    assert "ran `restic unlock` on labhost" in notes and f"forgot snapshot(s) {late[:8]}" in notes
    text = "\n".join(caplog.messages)
    assert "1 earlier failed attempt(s) await cleanup" in text
    assert f"swept earlier failed attempt {backup_id}" in text


def test_a_pending_attempt_that_cannot_be_swept_stays_pending_and_no_backup_starts(
        inv_path):
    inv = load_inventory(inv_path)
    repo = _repo(inv_path)
    store = _pending(inv, "stuck")
    backup_id = path_backup.new_backup_id()
    tag = path_backup.backup_tag(backup_id)
    store.add(path_backup.new_pending(backup_id, snapshot_host=inv.lab.name,
                                      reason="test: labhost unreachable"))

    def unreachable(target):
        raise SSHConnectError(f"ssh {target.name}: connection timed out (test)")

    # the host is still unreachable: nothing can be swept, the attempt stays pending
    with pytest.raises(SSHConnectError):
        path_backup.backup_path_set(inv, "stuck", connector=unreachable)
    assert _pending_ids(store) == [backup_id]

    # it answers again, but the connection drops while the sweep looks for the attempt's
    # restic (one still "runs": a process holding the tag as an argument)
    holder = subprocess.Popen(("sh", "-c", "sleep 60; :", "lost-restic", tag))
    killer = SessionKiller(match=lambda argv: b"labkeeper-pids" in argv
                           and tag.encode() in argv)
    killer.start()
    try:
        with pytest.raises(path_backup.PathBackupFailed) as err:
            path_backup.backup_path_set(inv, "stuck", stop_grace=60)
        assert holder.poll() is None  # never signalled: the sweep did not get that far
    finally:
        killer.stop.set()
        killer.join(5)
        _end(holder)
    assert killer.killed_sshd, "the sweep's SSH session was never killed"
    msg = str(err.value)
    assert msg.startswith("backup of stuck@labhost not started: earlier failed attempt "
                          f"{backup_id}"), msg
    assert "no restic of it still runs on labhost" in msg
    assert f"may still add a snapshot tagged {tag}" in msg and str(store.path) in msg
    assert err.value.transient  # a dropped connection: Prefect retries (and sweeps again)
    assert _pending_ids(store) == [backup_id]
    assert _series(repo, "stuck") == []
    store.remove([backup_id])


def test_a_sweep_whose_forget_is_blocked_by_another_runs_lock_backs_up_as_a_warning(
        inv_path, trees):
    inv = load_inventory(inv_path)
    repo = _repo(inv_path)
    store = _pending(inv, "contended")
    backup_id = path_backup.new_backup_id()
    tags = [*path_backup.series_tags("labhost", "contended"), path_backup.backup_tag(backup_id)]
    store.add(path_backup.new_pending(backup_id, snapshot_host=inv.lab.name,
                                      reason="test: labhost unreachable"))
    late = _plant_snapshot(repo, trees["clean"], host=inv.lab.name, tags=tags)

    other = _running_restic(repo, host="another-run", tags=["other"])  # e.g. a pg_backup
    try:
        res = path_backup.backup_path_set(inv, "contended", stop_grace=1)
    finally:
        _end(other)  # killed: its lock is left stale, for the next run to remove
    # nothing of the attempt runs any more: the backup went on, loudly
    assert res.status == "warning"
    notes = res.row()["notes"]
    assert f"cleanup of earlier failed attempt {backup_id}" in notes
    assert "failed to lock repository" in notes and "still await cleanup" in notes
    assert _pending_ids(store) == [backup_id]
    assert {s.id for s in _series(repo, "contended")} == {late, res.snapshot_id}

    # the other run is gone: the next backup finishes the sweep
    again = path_backup.backup_path_set(inv, "contended", stop_grace=1)
    assert again.status == "ok"
    assert {s.id for s in _series(repo, "contended")} == {res.snapshot_id, again.snapshot_id}
    assert not store.path.exists()
    assert f"forgot snapshot(s) {late[:8]}" in again.row()["notes"]


def test_restic_backend_retries_on_the_host_reach_the_run_log(lab, trees, tmp_path,
                                                              monkeypatch):
    # A lock the repository lists but restic cannot load (what a lock that vanished
    # under it looks like): restic 0.14 retries it for 45-95 s; the run log says so.
    # (The lock check before the backup gives up on reading it sooner.)
    monkeypatch.setattr(restic.locks, "CAT_LOCK_TIMEOUT", 2.0)
    inv = yaml.safe_load(lab.inventory_path.read_text())
    ghost_repo = tmp_path / "repo"
    inv["repositories"].append({"name": "local-repo", "url": str(ghost_repo),
                                "password": inv["repositories"][0]["password"]})
    inv["path_backups"] = [{"name": "ghosted", "host": "labhost", "repository": "local-repo",
                            "paths": [str(trees["clean"])]}]
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    loaded = load_inventory(path)
    restic.init(path_backup.open_repo(loaded, loaded.path_backup("ghosted")))
    ghost = ghost_repo / "locks" / ("1" * 64)
    ghost.symlink_to(tmp_path / "nowhere")
    said: list[str] = []
    retried = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())
            if "restic is retrying" in said[-1]:
                retried.set()

    def stop_restic_after_the_first_retry() -> None:
        if retried.wait(60):
            ghost.unlink()  # so the clean-up's own restic runs find no ghost
            for pid in restic_pids(b"paths:labhost/ghosted", own=True):
                os.kill(pid, signal.SIGKILL)

    stopper = threading.Thread(target=stop_restic_after_the_first_retry, daemon=True)
    stopper.start()
    watch, labkeeper_log = Watch(), logging.getLogger("labkeeper")
    level = labkeeper_log.level
    labkeeper_log.addHandler(watch)
    labkeeper_log.setLevel(logging.INFO)
    try:
        with pytest.raises(path_backup.PathBackupFailed):
            path_backup.backup_path_set(loaded, "ghosted")
    finally:
        labkeeper_log.removeHandler(watch)
        labkeeper_log.setLevel(level)
        retried.set()
        stopper.join(10)
    notes = [m for m in said if "restic is retrying" in m]
    assert notes and notes[0].startswith(
        "ghosted@labhost: restic is retrying Load(<lock/1111111111>, 0, 0) after "), said

