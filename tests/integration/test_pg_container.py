"""Databases inside containers (issue 17 item 6), on the real engine: PostgreSQL 17 in
a container with no published port, reached by ``docker exec`` over SSH (the lab's
sshd stands in for the app guest), dumped into restic with the same guarantees as a
TCP dump, drilled back into the same server's scratch database.

Faults are injected into the real processes mid-dump: the remote ``docker exec``,
the pg_dump inside the container, the SSH connection (its sshd session process),
the container itself (``docker stop``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from labkeeper import doctor, drill, pg_backup, restic
from labkeeper.inventory import load_inventory
from tests.fixtures.procs import adopt, process_argvs

SERVER = "labhost"
BIG_ROWS = 450_000


def big_name(pg17) -> str:
    """The big database's name, unique to this session's container: the fault
    injectors below (and other suites' injectors on a shared machine) pick processes
    by their argv, so it must not match anyone else's."""
    return f"lk17big_{pg17.port}"


@pytest.fixture(scope="module")
def ctr_inventory(lab, pg17, tmp_path_factory) -> Path:
    """The lab's inventory plus three databases of the PostgreSQL 17 container, all
    reached with ``docker exec`` over SSH on ``labhost``: ``ctrdb`` (appdb, user
    postgres on the container's socket, no password), ``ctrpw`` (appdb, user app
    with a password, TCP inside the container) and ``ctrbig`` (a bigger database for
    the fault tests); drilled on ``pg17c`` (the same container)."""
    c = pg17.container
    big = big_name(pg17)
    if not c.psql(f"SELECT 1 FROM pg_database WHERE datname = '{big}';").strip():
        c.psql(f"CREATE DATABASE {big} OWNER app;")
        c.psql("SET ROLE app;\nCREATE TABLE events (id bigint PRIMARY KEY, "
               "at timestamptz NOT NULL, payload text NOT NULL);\n"
               "INSERT INTO events SELECT i, timestamptz '2024-01-01' + i * interval '1 s', "
               "md5(i::text) || md5((i * 7)::text) || md5((i * 13)::text) "
               f"FROM generate_series(1, {BIG_ROWS}) i;", db=big, timeout=300)
    inv = yaml.safe_load(lab.inventory_path.read_text())
    container = {"name": pg17.name, "docker_host": pg17.engine.host, "pghost": c.sockdir}
    drill_spec = {"enabled": True, "server": "pg17c", "rpo_hours": 26, "rto_minutes": 30}
    common = {"host": SERVER, "port": pg17.port, "repository": "lab-repo", "drill": drill_spec}
    inv["databases"] += [
        {"name": "ctrdb", "dbname": "appdb", "user": "postgres", "container": container,
         **common},
        {"name": "ctrpw", "dbname": "appdb", "user": pg17.app_user,
         "password": f"file:{pg17.password_file}", "globals": False,
         "container": {**container, "pghost": "127.0.0.1"}, **common},
        {"name": "ctrbig", "dbname": big, "user": "postgres", "globals": False,
         "container": container, **common},
    ]
    inv["drills"]["servers"].append({"name": "pg17c", "host": SERVER, "port": pg17.port,
                                     "user": "postgres", "container": container})
    path = tmp_path_factory.mktemp("ctrinv") / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


def _series(inv, name: str) -> list[restic.Snapshot]:
    db = inv.database(name)
    return restic.find_snapshots(pg_backup.open_repo(inv, "lab-repo"),
                                 tags=["labkeeper", f"db:{inv.database_server(db)}/{name}"],
                                 host=inv.lab.name)


def test_container_database_over_ssh_is_backed_up_and_its_drill_verifies_the_manifest(
        ctr_inventory, pg17, caplog):
    inv = load_inventory(ctr_inventory)
    assert inv.database_server("ctrdb") == f"{SERVER}/{pg17.name}"
    detail = doctor.check_database(inv, "ctrdb").detail
    assert "PostgreSQL 17." in detail and f"container {pg17.name} on {SERVER}" in detail
    caplog.set_level(logging.INFO, logger="labkeeper")
    result = pg_backup.backup_database(inv, "ctrdb")
    assert result.table_count == 4 and result.total_rows == 500 + 1200 + 8000 + 20000
    label = pg_backup.server_label(inv, inv.database("ctrdb"))
    glob = pg_backup.backup_globals(inv, label, ["ctrdb"])
    assert glob.status == "ok" and glob.role_passwords, glob.detail  # superuser in the box
    repo = pg_backup.open_repo(inv, "lab-repo")
    stored = pg_backup.find_latest_backup(repo, lab=inv.lab.name,
                                          server=inv.database_server("ctrdb"), name="ctrdb")
    assert stored is not None and stored.backup_id == result.backup_id
    manifest = pg_backup.read_manifest(repo, stored)
    # the manifest was read in the dump's own exported snapshot, by the server's own tools
    assert manifest.server_version.startswith("17.") and manifest.pg_dump_version.startswith("17.")
    assert manifest.pg_snapshot and any(manifest.pg_snapshot in line for line in caplog.messages)
    assert manifest.dump is not None and manifest.dump.bytes == result.bytes_dumped
    drilled = drill.database_drill(inv, "ctrdb")
    assert drilled.passed, drilled.summary()
    tables = [c for c in drilled.checks if c.name.startswith("table ")]
    assert len(tables) == 4 and all(c.ok for c in tables)
    assert not pg17.container.psql(
        "SELECT datname FROM pg_database WHERE datname LIKE 'labkeeper_drill_%';").strip()


class Scanner(threading.Thread):
    """Reads every process's argv on this machine (the sshd's children included) until
    stopped; records any argv holding ``secret`` and every argv matching ``seen``."""

    def __init__(self, secret: bytes, seen: Callable[[list[bytes]], bool]) -> None:
        super().__init__(daemon=True)
        self.secret, self.seen_fn = secret, seen
        self.leaks: list[list[bytes]] = []
        self.seen: list[list[bytes]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for _pid, argv in process_argvs():
                if any(self.secret in a for a in argv):
                    self.leaks.append(argv)
                if self.seen_fn(argv):
                    self.seen.append(argv)
            time.sleep(0.002)


def test_password_reaches_the_container_by_environment_and_is_never_in_any_argv(
        ctr_inventory, pg17):
    inv = load_inventory(ctr_inventory)
    secret = pg17.app_password.encode()

    def remote_dump(argv: list[bytes]) -> bool:  # the docker client the sshd session ran
        return argv[0].endswith(b"docker") and b"exec" in argv and b"pg_dump" in argv

    scanner = Scanner(secret, remote_dump)
    scanner.start()
    try:
        result = pg_backup.backup_database(inv, "ctrpw")
    finally:
        scanner.halt.set()
        scanner.join(timeout=30)
    assert result.total_rows == 500 + 1200 + 8000 + 20000  # password auth on TCP worked
    assert scanner.seen, "the scan never saw the remote docker exec of pg_dump"
    assert all(b"PGPASSWORD" in a for a in scanner.seen)  # handed over by name only
    assert not scanner.leaks, scanner.leaks


# -- faults mid-dump -----------------------------------------------------------------------

@pytest.fixture
def engine_adopted(pg17):
    """The session's Docker engine counts as this session's (tests/fixtures/procs.py):
    the shims, and under them the container's processes (the pg_dump ``docker exec``
    runs in it), are detached from pytest. The remote ``docker exec`` client and the
    sshd session above it run under the lab's sshd, adopted by the ``lab`` fixture."""
    undo = adopt(pg17.engine.pids)
    yield
    undo()


def _find(pred: Callable[[list[bytes], int], bool], timeout: float = 60) -> int:
    """The first of this session's processes ``pred`` picks (never another session's:
    the SIGSTOP/SIGKILL that follows must not hit a stranger)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, argv in process_argvs(own=True):
            if pred(argv, pid):
                return pid
        time.sleep(0.005)
    raise AssertionError("the process to interrupt never appeared")


def _remote_docker_exec(argv: list[bytes]) -> bool:
    """The docker client the sshd session runs for the dump (not ``pg_dump --version``)."""
    return argv[0].endswith(b"docker") and b"exec" in argv and b"pg_dump" in argv \
        and any(a.startswith(b"--snapshot=") for a in argv)


def _pg_dump_in_container(argv: list[bytes]) -> bool:
    return argv[0].endswith(b"pg_dump") and any(a.startswith(b"--snapshot=") for a in argv) \
        and b"exec" not in argv


def _parents(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[-1].split()[1])
        out.append(pid)
    return out


MID_STREAM = 4 << 20
"""Bytes the process must have written before the fault: the stream is flowing."""


def _written(pid: int) -> int | None:
    """Bytes ``pid`` has written (``wchar`` of /proc/PID/io); None once it is gone."""
    try:
        io = Path(f"/proc/{pid}/io").read_text()
    except OSError:
        return None
    return int(next(ln.split()[1] for ln in io.splitlines() if ln.startswith("wchar:")))


def _hold_mid_stream(pid: int, nbytes: int, timeout: float = 60) -> bool:
    """Let ``pid`` run in small steps (SIGSTOP/SIGCONT) until it has written ``nbytes``
    and return with it stopped: however loaded the machine, the fault then lands
    mid-stream, never after the dump ended. False when it ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, signal.SIGSTOP)
        except ProcessLookupError:
            return False
        done = _written(pid)
        if done is None:
            return False
        if done >= nbytes:
            return True
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.005)
    return False


def _resume(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def _drop_ssh(pid: int) -> None:
    """SIGKILL the sshd session process serving the remote docker exec: the
    connection is gone mid-stream."""
    for parent in _parents(pid):
        try:
            argv0 = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        if argv0.startswith(b"sshd:"):
            os.kill(parent, signal.SIGKILL)
            return
    raise AssertionError("no sshd session above the remote docker exec")


FAULTS = {
    "docker exec killed": (_remote_docker_exec, _kill),
    "pg_dump in the container killed": (_pg_dump_in_container, _kill),
    "ssh connection dropped": (_remote_docker_exec, _drop_ssh),
    # held in the container (not the docker client: a stopped exec client would block
    # the daemon's stop until it reads again)
    "container stopped": (_pg_dump_in_container, None),
}


EXPECTED = {
    "docker exec killed": "the SSH connection was lost or the remote command was killed",
    "pg_dump in the container killed": "was killed (SIGKILL",
    "ssh connection dropped": "connection lost",
    "container stopped": "was killed (SIGKILL: killed, or its container stopped)",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_cut_container_dump_is_never_counted(ctr_inventory, pg17, engine_adopted, fault):
    inv = load_inventory(ctr_inventory)
    before = _series(inv, "ctrbig")
    pick, act = FAULTS[fault]
    mark = big_name(pg17).encode()

    def ours(argv: list[bytes]) -> bool:  # only this test's processes
        return any(mark in a for a in argv) and pick(argv)

    # A dump an earlier fault cut may still run in the container (killing the docker
    # client does not end the exec'd process): never take it for this one.
    earlier = {pid for pid, argv in process_argvs(own=True) if ours(argv)}

    def find(argv: list[bytes], pid: int) -> bool:
        return pid not in earlier and ours(argv)

    hit: dict[str, object] = {}

    def inject() -> None:
        pid = _find(find)
        hit["alive"] = _hold_mid_stream(pid, MID_STREAM)  # well into the stream
        try:
            if act is None:
                pg17.container.run("stop", "-t", "1", pg17.name)
            else:
                act(pid)
        finally:
            _resume(pid)
        hit["done"] = True

    injector = threading.Thread(target=inject, daemon=True)
    injector.start()
    try:
        with pytest.raises(pg_backup.BackupFailed) as info:
            pg_backup.backup_database(inv, "ctrbig")
    finally:
        injector.join(timeout=90)
        if fault == "container stopped":
            pg17.container.restart()
    assert hit.get("done") and hit.get("alive"), hit
    msg = str(info.value)
    assert "no snapshot was finalised" in msg and f"in container {pg17.name} on {SERVER}" in msg
    assert EXPECTED[fault] in msg, msg
    # a lost connection is worth a retry, a killed dump is not (a stopping server may
    # be either: pg_dump may have said "terminating connection" before it was killed)
    if fault != "container stopped":
        assert info.value.transient == (fault == "ssh connection dropped"), msg
    assert info.value.backup_id
    repo = pg_backup.open_repo(inv, "lab-repo")
    assert not restic.find_snapshots(repo, tags=[pg_backup.backup_tag(info.value.backup_id)],
                                     host=inv.lab.name)
    assert _series(inv, "ctrbig") == before
    print(f"{fault}: {msg}")


def test_container_dump_works_again_after_the_faults(ctr_inventory):
    inv = load_inventory(ctr_inventory)
    result = pg_backup.backup_database(inv, "ctrbig")
    assert result.total_rows == BIG_ROWS
