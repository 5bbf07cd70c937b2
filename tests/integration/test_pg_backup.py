"""Nightly PostgreSQL backups against the real local lab: real pg_dump, psql, restic and
moto's S3 server; faults are injected into the real processes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from flows.pg_backup import pg_backup_flow
from labkeeper import pg_backup, postgres, process, restic
from labkeeper.inventory import load_inventory
from labkeeper.locallab.lab import write_secret
from tasks import pg_backup as backup_tasks
from tests.fixtures.procs import HeldStart, io_bytes, process_argvs, restic_pids
from tests.fixtures.waiting import wait_until
from tests.integration.test_doctor_flow import ArgvWatcher, _flow_run_record

BIG = "bigdb"
BIG_ROWS = 450_000  # ~60 MB of plain dump: streaming takes about a second


@pytest.fixture(scope="module")
def big(lab, tmp_path_factory):
    """A database big enough that its dump takes a moment, plus an inventory with it."""
    pg = lab.postgres
    if not pg.psql_super(f"SELECT 1 FROM pg_database WHERE datname = '{BIG}';").strip():
        pg.psql_super(f"CREATE DATABASE {BIG} OWNER {pg.app_user};")
        pg.psql_super(
            f"SET ROLE {pg.app_user};\n"
            "CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, "
            "payload text NOT NULL);\n"
            "INSERT INTO events SELECT i, timestamptz '2024-01-01' + i * interval '1 second', "
            "md5(i::text) || md5((i * 7)::text) || md5((i * 13)::text) "
            f"FROM generate_series(1, {BIG_ROWS}) i;\n"
            "CREATE TABLE \"Odd Name\" (v int);\nINSERT INTO \"Odd Name\" VALUES (1), (2);\n",
            db=BIG, timeout=180)
    inv = yaml.safe_load(lab.inventory_path.read_text())
    first = inv["databases"][0]
    inv["databases"].append({**first, "name": BIG, "dbname": BIG})
    path = tmp_path_factory.mktemp("pgb") / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    yield path
    pg.psql_super(f"DROP DATABASE IF EXISTS {BIG} WITH (FORCE);")


@pytest.fixture
def no_retries(monkeypatch):
    """Run the backup task once (the fault tests check one attempt, then retry by hand)."""
    monkeypatch.setattr(backup_tasks, "backup_database",
                        backup_tasks.backup_database.with_options(retries=0))


def _repo(path: Path) -> restic.Repo:
    return pg_backup.open_repo(load_inventory(path), "lab-repo")


def _series(repo: restic.Repo, name: str, kind: str = "pg_dump") -> list[restic.Snapshot]:
    return restic.find_snapshots(repo, tags=pg_backup.series_tags("127.0.0.1", name, kind),
                                 host="local-lab")


def _count_copy_rows(dump: bytes, table: str) -> int:
    lines = dump.split(b"\n")
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"COPY {table} ".encode()))
    end = lines.index(b"\\.", start)
    return end - start - 1


class Killer(threading.Thread):
    """Sends ``sig`` to (or runs ``action`` on) the first of this session's processes
    whose argv holds every needle, once ``ready(pid)`` says it has reached the moment
    the fault is for (an observable state, never a delay: a delay lands elsewhere on a
    loaded machine); records whether it was still running then. Nothing is done once
    :attr:`stop` is set (the run it was for is over)."""

    def __init__(self, needles: list[bytes], *, ready: Callable[[int], bool],
                 sig: int = signal.SIGKILL, action: Callable[[int], None] | None = None
                 ) -> None:
        super().__init__(daemon=True)
        self.needles, self.ready, self.sig, self.action = needles, ready, sig, action
        self.killed_pid: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid, argv in process_argvs(own=True):  # never another session's
                if all(any(n in a for a in argv) for n in self.needles):
                    try:
                        while not self.ready(pid):
                            if self.stop.is_set():
                                return
                            time.sleep(0.002)
                        if self.action is not None:
                            self.action(pid)
                        else:
                            os.kill(pid, self.sig)
                        self.killed_pid = pid
                    except OSError:  # the process is gone (ProcessLookupError, no /proc entry)
                        pass
                    return
            time.sleep(0.005)


class ReadKiller(Killer):
    """SIGKILLs the first process whose argv holds every needle once it has read
    ``min_read`` bytes: mid-stream whatever its start-up cost (key derivation)."""

    def __init__(self, needles: list[bytes], *, min_read: int) -> None:
        super().__init__(needles, ready=lambda pid: io_bytes(pid, "rchar") >= min_read)


class WriteKiller(Killer):
    """SIGKILLs the first process whose argv holds every needle once it has written
    ``min_written`` bytes: mid-stream however fast or slow the machine is (a fixed
    delay lets a quick dump finish first on an idle machine)."""

    def __init__(self, needles: list[bytes], *, min_written: int) -> None:
        super().__init__(needles, ready=lambda pid: io_bytes(pid, "wchar") >= min_written)


_READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())
"""The number of read(2), first field of /proc/PID/task/TID/syscall."""


def waiting_on_stdin(pid: int) -> bool:
    """True while a thread of ``pid`` is blocked in read(2) on its stdin (fd 0). A
    ``restic backup --stdin`` reads its stdin only once it has opened the repository,
    taken its lock and loaded the index: blocked there, it holds its lock and has taken
    all the data written so far (a PendingBackup's primed bytes): it waits for the rest.
    (restic, a Go program, reads a blocking pipe with read(2) in a thread of its own,
    0.14 and 0.18 alike.) OSError once the process is gone."""
    assert _READ_SYSCALL is not None, f"read(2)'s number on {platform.machine()}?"
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/syscall") as f:
                call = f.read().split()
        except OSError:  # the thread ended meanwhile
            continue
        if call[:2] == [_READ_SYSCALL, "0x0"]:
            return True
    return False


def _locks(repo: restic.Repo) -> list[restic.LockInfo]:
    return restic.list_locks(repo)


# -- the happy path, tags, manifest, artifact, events, secrets ---------------------------

@pytest.mark.restic_matrix
def test_backup_run_stores_dump_and_manifest_per_database_with_tags_artifact_and_events(
        lab, big, prefect_harness):
    secrets = [p.read_text().strip() for p in lab.secrets_dir.iterdir()]
    with ArgvWatcher() as watcher:
        state = pg_backup_flow(lab=str(big), databases=["appdb", "photos"],
                               return_state=True)
    assert state.is_completed(), state.message
    rows = {r["database"]: r for r in state.result()}
    assert rows["appdb"]["status"] == "ok" and rows["photos"]["status"] == "ok"
    assert rows["appdb"]["tables"] == 4 and rows["appdb"]["bytes dumped"] > 1_000_000
    from labkeeper import metrics
    from labkeeper.inventory import load_inventory

    recorded = {(s.name, s.labels["series"]): s.value
                for s in metrics.Store(load_inventory(big).settings.state_dir).samples()}
    assert recorded[("labkeeper_backup_success", "db:127.0.0.1/appdb")] == 1
    assert recorded[("labkeeper_backup_dumped_bytes", "db:127.0.0.1/appdb")] == \
        rows["appdb"]["bytes dumped"]

    repo = _repo(big)
    for name in ("appdb", "photos"):
        dump = _series(repo, name)[-1]
        assert dump.hostname == "local-lab"
        assert {"labkeeper", f"db:127.0.0.1/{name}", "kind:pg_dump"} <= set(dump.tags)
        assert dump.paths == [f"/{name}.sql"]
        assert dump.short_id == rows[name]["snapshot"]
        stored = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1",
                                              name=name)
        assert stored is not None and stored.dump.id == dump.id
        manifest = pg_backup.read_manifest(repo, stored)
        assert manifest.backup_id == rows[name]["backup id"] == stored.backup_id
        # the full id, whichever restic wrote it (0.14's summary names the short one)
        assert manifest.dump is not None and manifest.dump.snapshot_id == dump.id
        assert manifest.dump.bytes == rows[name]["bytes dumped"]
        assert manifest.dump_format == "plain" and manifest.server_version.startswith("15")
    manifest = pg_backup.read_manifest(
        repo, pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1",
                                           name="appdb"))
    counts = {t.name: t.rows for t in manifest.tables}
    assert counts == {"users": 500, "projects": 1200, "invoices": 8000, "audit_log": 20000}

    # globals: the lab's role is not a superuser -> dumped without passwords, and said so
    grow = next(r for r in state.result() if r["database"].startswith("globals "))
    assert grow["status"] == "warning" and "WITHOUT role passwords" in grow["notes"]
    # This server's globals are in the repository (an unchanged globals dump is not stored
    # again, and other tests of the session store this cluster's globals under another
    # address, so the newest globals snapshot need not be this server's).
    g = restic.find_snapshots(repo, tags=["labkeeper", "kind:pg_globals"], host="local-lab")
    assert any(s.paths[0].startswith("/globals-127.0.0.1-") for s in g), [s.paths for s in g]

    run, logs, arts = _flow_run_record(state)
    table = next(a for a in arts if a.key == "pg-backup")
    assert table.type == "table"
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert {r["database"] for r in data} >= {"appdb", "photos"}
    text = "\n".join(log.message for log in logs)
    assert "WITHOUT role passwords" in text

    events = _events("labkeeper.backup.succeeded", "/appdb")
    resources = {(e["event"], e["resource"]["prefect.resource.id"]) for e in events}
    assert ("labkeeper.backup.succeeded", "labkeeper.database.127.0.0.1/appdb") in resources

    # secrets: never in a child's argv, the logs, the parameters or the artifacts
    assert any(b"pg_dump" in c for c in watcher.seen) and any(
        b"--stdin-filename" in c for c in watcher.seen), "the watcher missed the children"
    haystacks = {"parameters": repr(run.parameters),
                 "logs": text,
                 "artifacts": "\n".join(f"{a.key} {a.data} {a.description}" for a in arts)}
    for secret in secrets:
        for where, hay in haystacks.items():
            assert secret not in hay, f"a lab secret leaked into the {where}"
        for cmdline in watcher.seen:
            assert secret.encode() not in cmdline, "a lab secret leaked into a child's argv"


def _events(prefix: str, resource_suffix: str = "", since: datetime | None = None
            ) -> list[dict]:
    """Events whose name starts with ``prefix`` (and resource id ends with the suffix),
    occurred ``since`` then (default: Prefect's, the last day)."""
    from prefect.client.orchestration import get_client
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)
    occurred = {"occurred": {"since": since.isoformat()}} if since else {}

    async def read():
        async with get_client() as client:
            for _ in range(100):
                resp = await client._client.post(
                    "/events/filter",
                    json={"filter": {"event": {"prefix": [prefix]}, **occurred}, "limit": 50})
                found = [e for e in resp.json().get("events", [])
                         if e["resource"]["prefect.resource.id"].endswith(resource_suffix)]
                if found:
                    return found
                await asyncio.sleep(0.1)
            return []

    return asyncio.run(read())


def test_row_counts_run_in_the_snapshot_without_parallel_workers_or_jit(lab, big):
    # The counts run alongside pg_dump: neither parallel workers nor JIT compilation
    # may add server CPU the dump competes for.
    inv = load_inventory(big)
    conn = pg_backup.conn_for(inv, inv.database(BIG))
    session = postgres.PsqlSession(conn, timeout=60)
    try:
        session.start()
        postgres.open_snapshot(session)
        counts = {t: n for _s, t, n in postgres.count_rows(session)}
        settings = session.query("SELECT current_setting('jit'), "
                                 "current_setting('max_parallel_workers_per_gather')")
    finally:
        session.close(kill=True)
    assert counts["Odd Name"] == int(postgres.query(conn, 'SELECT count(*) FROM "Odd Name"')[0][0])
    assert settings == [["off", "0"]]


def test_manifest_counts_come_from_the_dumps_own_snapshot_while_rows_are_inserted(lab, big,
                                                                                   tmp_path):
    inv = load_inventory(big)
    conn = pg_backup.conn_for(inv, inv.database(BIG))
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            postgres.query(conn, f"INSERT INTO \"Odd Name\" SELECT g FROM generate_series(1, "
                                 f"{50 + i}) g; INSERT INTO events VALUES ({10_000_000 + i}, "
                                 f"now(), 'x');", timeout=30)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        result = pg_backup.backup_database(inv, BIG)
    finally:
        stop.set()
        t.join()
    repo = _repo(big)
    stored = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1", name=BIG)
    assert stored and stored.dump.id == result.snapshot_id
    manifest = pg_backup.read_manifest(repo, stored)
    counts = {t.name: t.rows for t in manifest.tables}
    out = tmp_path / "dump.sql"
    with open(out, "wb") as f:
        process.run(restic.dump_argv(repo, stored.dump.id, f"/{BIG}.sql"), timeout=120,
                    codes=restic.EXIT_CODES, env=repo.env(), stdout_fd=f.fileno())
    dump = out.read_bytes()
    assert _count_copy_rows(dump, 'public."Odd Name"') == counts["Odd Name"]
    assert _count_copy_rows(dump, "public.events") == counts["events"] >= BIG_ROWS
    live = int(postgres.query(conn, 'SELECT count(*) FROM "Odd Name";')[0][0])
    assert live > counts["Odd Name"], "the writer should have kept inserting during the dump"


# -- faults: each fails clearly, leaves no snapshot, and a retry succeeds ----------------

def _both_series(repo: restic.Repo) -> set[str]:
    return {s.id for kind in ("pg_dump", "pg_manifest") for s in _series(repo, BIG, kind)}


def _run_with_fault(big: Path, killer: Killer, **kw):
    repo = _repo(big)
    before = _both_series(repo)
    killer.start()
    try:
        state = pg_backup_flow(lab=str(big), databases=[BIG], return_state=True, **kw)
    finally:
        killer.stop.set()
    assert killer.killed_pid, "the fault was not injected"
    assert state.is_failed()
    after = _both_series(repo)
    assert after == before, "a snapshot (dump or manifest) of the failed backup is stored"
    assert not [lk for lk in _locks(repo) if not restic.pid_alive(lk.pid)], "stale lock left"
    return state


def _message(state) -> str:
    _run, logs, _arts = _flow_run_record(state)
    return "\n".join(log.message for log in logs)


@pytest.mark.restic_matrix
def test_pg_dump_killed_mid_stream_fails_without_snapshot_then_a_retry_succeeds(
        lab, big, prefect_harness, no_retries):
    # the port: this session's pg_dump, not one of another test session on the machine
    killer = WriteKiller([b"pg_dump", b"--snapshot=", BIG.encode(),
                          str(lab.postgres.port).encode()], min_written=8 << 20)
    state = _run_with_fault(big, killer)
    text = _message(state)
    assert "pg_dump failed" in text and "killed by SIGKILL" in text
    assert "restic was stopped before end-of-stream" in text
    assert pg_backup_flow(lab=str(big), databases=[BIG], return_state=True).is_completed()


@pytest.mark.restic_matrix
def test_restic_killed_mid_stream_fails_without_snapshot_and_its_lock_is_removed(
        lab, big, prefect_harness, no_retries):
    killer = ReadKiller([b"restic", f"{BIG}.sql".encode()], min_read=16 << 20)
    state = _run_with_fault(big, killer)
    text = _message(state)
    assert "killed by SIGKILL" in text and "never received end-of-stream" in text
    assert "removed the stale lock" in text
    assert pg_backup_flow(lab=str(big), databases=[BIG], return_state=True).is_completed()


@pytest.mark.restic_matrix
def test_manifest_restic_killed_while_waiting_is_replaced_and_leaves_no_lock(lab, big, caplog):
    # The manifest's restic starts with the dump and waits for its data; if it dies
    # meanwhile, a fresh restic stores the manifest and the dead one's lock is removed.
    repo = _repo(big)
    # killed once it waits for its data: it holds a lock then, which must be removed
    killer = Killer([b"restic", f"{BIG}.manifest.json".encode()], ready=waiting_on_stdin)
    killer.start()
    try:
        caplog.set_level(logging.INFO, logger="labkeeper")
        result = pg_backup.backup_database(load_inventory(big), BIG)
    finally:
        killer.stop.set()
    assert killer.killed_pid, "the fault was not injected"
    said = caplog.messages
    assert any("manifest's restic had stopped early" in m for m in said), said
    stored = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1", name=BIG)
    assert stored is not None and stored.backup_id == result.backup_id
    manifest = pg_backup.read_manifest(repo, stored)
    assert manifest.dump is not None and manifest.dump.bytes == result.bytes_dumped
    assert not [lk for lk in _locks(repo) if not restic.pid_alive(lk.pid)], "stale lock left"


@pytest.mark.restic_matrix
def test_pending_backup_stores_its_data_on_finish_and_nothing_when_aborted(lab, big):
    repo = _repo(big)
    tags = ["labkeeper", "kind:test-pending"]
    aborted = restic.PendingBackup(repo, filename="gone.json", host="local-lab",
                                   tags=[*tags, "backup:aborted"])
    kept = restic.PendingBackup(repo, filename="kept.json", host="local-lab",
                                tags=[*tags, "backup:kept"])
    wait_until(lambda: waiting_on_stdin(aborted.pid) and waiting_on_stdin(kept.pid),
               timeout=120, what="both restics to wait for their data (locks taken)")
    aborted.abort()
    summary = kept.finish(b'{"rows": 42}\n', timeout=60)
    assert summary.total_bytes_processed == 13 and summary.files == 1
    snaps = restic.find_snapshots(repo, tags=["kind:test-pending"], host="local-lab")
    assert [s.tags[-1] for s in snaps] == ["backup:kept"]
    assert restic.dump_file(repo, snaps[0].id, "/kept.json") == '{"rows": 42}\n'
    restic.unlock(repo)  # the lock the killed one left
    assert not [lk for lk in _locks(repo) if not restic.pid_alive(lk.pid)]
    restic.forget_ids(repo, [s.id for s in snaps])


@pytest.mark.restic_matrix
def test_pending_backup_reads_its_primed_bytes_only_once_it_holds_its_lock(lab, big):
    repo = _repo(big)
    pending = restic.PendingBackup(repo, filename="primed.json", host="local-lab",
                                   tags=["labkeeper", "kind:test-primed"])
    try:
        pending.prime(b"{")
        assert not pending.wait_reading(0), "read before it could have opened the repository"
        assert pending.wait_reading(60)
        assert pending.pid in {lk.pid for lk in _locks(repo)}, "reading without its lock"
        with pytest.raises(ValueError, match="prime"):
            pending.finish(b"[1]", timeout=60)
        summary = pending.finish(b'{"rows": 7}\n', timeout=60)
    finally:
        pending.abort()
    assert summary.total_bytes_processed == 12 and summary.files == 1
    snaps = restic.find_snapshots(repo, tags=["kind:test-primed"], host="local-lab")
    assert restic.dump_file(repo, snaps[0].id, "/primed.json") == '{"rows": 7}\n'
    restic.forget_ids(repo, [s.id for s in snaps])


def _thread_running(code) -> bool:
    """Whether a thread of this process is inside the function whose code is ``code``."""
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code is code:
                return True
            frame = frame.f_back
    return False


@pytest.mark.restic_matrix
def test_dump_restic_keeps_its_lock_until_the_manifest_restic_holds_its_own(
        lab, big, monkeypatch, tmp_path, caplog):
    # restic 0.14 retries a lock file that vanishes while it checks the lock list for
    # 45-95 s. A small database's dump restic used to finish (its lock gone) while the
    # niced manifest restic was still taking its lock. Here the manifest restic is held
    # before it starts (HeldStart: it has taken no lock); the dump's stream must then
    # wait for it, its restic alive and locked, and not end.
    inv = load_inventory(big)
    small = next(d.name for d in inv.databases if d.name != BIG)
    handoff = restic.PendingBackup.wait_reading.__code__  # the dump's end waits here
    manifest_done = restic.PendingBackup.finish.__code__  # the stream ended: too early
    caplog.set_level(logging.INFO, logger="labkeeper")
    outcome: list[object] = []
    with HeldStart(restic.default_binary(), pg_backup.manifest_filename(small), tmp_path,
                   monkeypatch, env_var=restic.BINARY_ENV) as held:
        worker = threading.Thread(target=lambda: outcome.append(
            pg_backup.backup_database(inv, small)), daemon=True)
        worker.start()
        try:
            held.wait_held(120, unless=lambda: not worker.is_alive())
            deadline = time.monotonic() + 120
            while not _thread_running(handoff) and time.monotonic() < deadline:
                assert worker.is_alive() and not _thread_running(manifest_done), \
                    "the dump's stream ended before the manifest's restic held its lock: " \
                    f"{caplog.messages}"
                time.sleep(0.005)
            assert _thread_running(handoff), \
                f"the dump never waited for the manifest: {caplog.messages}"
            dump_restics = restic_pids(b"kind:pg_dump", b"--stdin", parent=os.getpid())
            assert len(dump_restics) == 1, "the dump's restic ended before the manifest's " \
                                           f"restic held its lock: {dump_restics}"
            assert dump_restics[0] in {lk.pid for lk in _locks(_repo(big))}, \
                "the dump's restic let go of its lock before the manifest's restic held one"
        finally:
            held.release()
            worker.join(timeout=300)
    assert not worker.is_alive()
    assert outcome and isinstance(outcome[0], pg_backup.BackupResult), caplog.messages
    # no lock vanished under a restic: 0.14 would retry it, 0.17+ would say it could not load it
    said = caplog.messages
    assert not [m for m in said if "restic is retrying" in m or "restic could not" in m], said


def test_gated_relay_hands_the_gate_the_true_tail_of_a_stream_written_in_bursts(tmp_path):
    # The trailer check rests on the relay keeping the stream's real last 4096 bytes,
    # whatever the sizes of the producer's writes and of the relay's reads.
    script = (
        "import os, random, sys, time\n"
        "rnd = random.Random(7)\n"
        "out = sys.stdout.buffer\n"
        "for i in range(400):\n"
        "    out.write(rnd.randbytes(rnd.choice([1, 100, 4095, 4096, 4097, 70000, 300000])))\n"
        "    out.flush()\n"
        "    if i % 50 == 0: time.sleep(0.01)\n"
        "out.write(b'\\n--\\n-- PostgreSQL database dump complete\\n--\\n\\n')\n")
    expected = subprocess.run([sys.executable, "-c", script], capture_output=True,
                              check=True).stdout
    seen: list[tuple[bytes, int]] = []

    def gate(tail: bytes, nbytes: int) -> str | None:
        seen.append((tail, nbytes))
        return postgres.plain_dump_complete(tail, nbytes)

    res = process.pipeline([process.Stage((sys.executable, "-c", script), eof_gate=gate),
                            ("sha256sum",)], timeout=60)
    assert res.stdout.split()[0] == hashlib.sha256(expected).hexdigest()
    assert seen == [(expected[-process.GATE_TAIL_BYTES:], len(expected))]
    assert res.bytes_relayed == (len(expected),) and res.eof_given == (True,)


_LINGERING_CONSUMER = """\
import os, signal, time
os.close(0)
parent = os.getppid()

def producer_alive():
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")]
        state, ppid = stat[stat.rindex(b")") + 2:].split()[:2]
        if comm == b"yes" and int(ppid) == parent and state not in (b"Z", b"X"):
            return True
    return False

while producer_alive():
    time.sleep(0.005)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_consumer_that_stops_reading_then_dies_is_the_cause_not_the_producer_we_stopped():
    # restic killed from outside closes its stdin a moment before it can be reaped;
    # the producer we then stop must not be blamed. This consumer makes that moment
    # last until the producer was stopped: it closes its stdin, waits until its
    # sibling ``yes`` is dead (a zombie or reaped), then dies.
    consumer = (sys.executable, "-c", _LINGERING_CONSUMER)
    res = process.pipeline([("yes",), consumer], timeout=60, check=False)
    prod, cons = res.stages
    assert res.cause == 1, (prod.meaning, cons.meaning)
    assert cons.returncode == -9 and cons.meaning == "killed by SIGKILL"
    assert "stopped reading" in prod.meaning and res.eof_given == (False,)


@pytest.mark.restic_matrix
@pytest.mark.parametrize("fault", ["bad password", "missing database"])
def test_pg_dump_exiting_non_zero_never_gives_restic_an_eof(lab, big, fault):
    inv = load_inventory(big)
    conn = pg_backup.conn_for(inv, inv.database(BIG))
    if fault == "bad password":
        conn = dataclasses.replace(conn, password=SecretStr("wrong-password-for-test"))
        expect = "password authentication failed"
    else:
        conn = dataclasses.replace(conn, dbname="no_such_database")
        expect = 'database "no_such_database" does not exist'
    repo = _repo(big)
    with pytest.raises(restic.StreamFailed) as info:
        restic.stream_backup(
            repo, process.Stage(postgres.pg_dump_argv(conn), codes=postgres.PG_DUMP_CODES,
                                env=conn.env()),
            filename="fault.sql", host="local-lab", tags=["labkeeper", "kind:test-fault"],
            gate=postgres.plain_dump_complete, timeout=60)
    assert info.value.cause == "producer" and not info.value.eof_given
    assert expect in str(info.value) and "exit 1" in str(info.value)
    assert restic.find_snapshots(repo, tags=["kind:test-fault"]) == []
    restic.unlock(repo)


def test_snapshot_that_cannot_be_opened_fails_the_backup_and_leaves_no_lock(lab, big,
                                                                            tmp_path):
    # The dump's restic starts before the snapshot is opened (its start-up overlaps it);
    # when opening fails, restic is killed before any input and its lock is removed.
    inv = yaml.safe_load(big.read_text())
    entry = next(d for d in inv["databases"] if d["name"] == BIG)
    entry["dbname"] = "bigdb_gone"
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    repo = _repo(path)
    before = {kind: {s.id for s in _series(repo, BIG, kind)}
              for kind in ("pg_dump", "pg_manifest")}
    with pytest.raises(pg_backup.BackupFailed) as info:
        pg_backup.backup_database(load_inventory(path), BIG)
    assert "could not open a snapshot of bigdb_gone" in str(info.value)
    assert 'database "bigdb_gone" does not exist' in str(info.value)
    assert {kind: {s.id for s in _series(repo, BIG, kind)} for kind in before} == before
    assert _locks(repo) == []


@pytest.mark.parametrize("fault", ["bad password", "missing database"])
def test_flow_with_a_bad_password_or_missing_database_fails_that_database_only(
        lab, big, prefect_harness, no_retries, tmp_path, fault):
    inv = yaml.safe_load(big.read_text())
    entry = next(d for d in inv["databases"] if d["name"] == "photos")
    if fault == "bad password":
        entry["password"] = f"file:{write_secret(tmp_path / 'bad', 'not-the-pg-password')}"
        expect = "password authentication failed"
    else:
        entry["dbname"] = "photos_gone"
        expect = 'database "photos_gone" does not exist'
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    repo = _repo(path)
    before = {s.id for s in _series(repo, "photos")}
    started = datetime.now(tz=UTC)
    state = pg_backup_flow(lab=str(path), databases=["appdb", "photos"], return_state=True)
    assert state.is_failed() and "photos" in state.message
    assert {s.id for s in _series(repo, "photos")} == before
    _run, logs, arts = _flow_run_record(state)
    assert expect in "\n".join(log.message for log in logs)
    table = next(a for a in arts if a.key == "pg-backup")
    data = json.loads(table.data) if isinstance(table.data, str) else table.data
    status = {r["database"]: r["status"] for r in data}
    assert status["appdb"] == "ok" and status["photos"] == "failed"
    assert _events("labkeeper.backup.failed", "/photos", since=started)


def test_s3_frozen_as_restic_opens_the_repo_stalls_without_snapshot_then_a_retry_succeeds(
        lab, big, prefect_harness, no_retries, tmp_path, monkeypatch):
    from labkeeper.locallab.s3 import LocalS3

    s3 = LocalS3(tmp_path / "s3", bucket="fault-bucket")
    s3.start()
    try:
        inv = yaml.safe_load(big.read_text())
        repo_entry = inv["repositories"][0]
        sec = tmp_path / "secrets"
        repo_entry.update({
            "url": f"s3:{s3.endpoint}/{s3.bucket}/restic",
            "cache_dir": str(tmp_path / "cache"),
        })
        repo_entry["s3"] = {
            **repo_entry["s3"], "endpoint": s3.endpoint, "bucket": s3.bucket,
            "access_key_id": f"file:{write_secret(sec / 'ak', s3.access_key_id)}",
            "secret_access_key": f"file:{write_secret(sec / 'sk', s3.secret_access_key)}"}
        inv.setdefault("settings", {}).setdefault("tuning", {})["stall_timeout"] = 3.0
        path = tmp_path / "lab.yaml"
        path.write_text(yaml.safe_dump(inv))
        repo = _repo(path)
        restic.init(repo)
        assert s3.pid

        # The S3 server stops answering while the dump's restic opens the repository:
        # that restic is held before it starts (HeldStart), the server frozen, then
        # restic let go. Its requests hang, it never reads the dump, the stall
        # detector stops it; the server comes back once restic is gone (the cleanup
        # needs it). A restic that got to read the dump first would not stall: it and
        # the kernel's socket buffers take in the whole dump, then wait for the server
        # with no data left unaccepted (a freeze at a moment found by polling may come
        # that late on a loaded machine).
        done = threading.Event()
        hit: dict[str, int] = {}

        def freeze_then_thaw() -> None:
            try:
                pid = held.wait_held(120, unless=done.is_set)
            except TimeoutError:
                return
            os.kill(s3.pid, signal.SIGSTOP)
            hit["restic"] = pid
            held.release()  # the wrapper execs restic: the same pid
            while restic.pid_alive(pid) and not done.is_set():
                time.sleep(0.05)
            os.kill(s3.pid, signal.SIGCONT)

        with HeldStart(restic.default_binary(), f"{BIG}.sql", tmp_path, monkeypatch,
                       env_var=restic.BINARY_ENV) as held:
            fault = threading.Thread(target=freeze_then_thaw, daemon=True)
            fault.start()
            try:
                state = pg_backup_flow(lab=str(path), databases=[BIG], return_state=True)
            finally:
                done.set()
                fault.join(60)
                os.kill(s3.pid, signal.SIGCONT)
        assert hit.get("restic"), "the fault was not injected"
        assert state.is_failed()
        text = _message(state)
        assert "restic accepted no data for 3 s" in text
        assert "no snapshot was finalised" in text
        assert _series(repo, BIG) == []
        assert _locks(repo) == []
        retry = pg_backup_flow(lab=str(path), databases=[BIG], return_state=True)
        assert retry.is_completed(), retry.message
        assert len(_series(repo, BIG)) == 1 and len(_series(repo, BIG, "pg_manifest")) == 1
    finally:
        s3.stop()


# -- a failed attempt whose cleanup cannot run is remembered and swept --------------------

class FreezeThenLock(threading.Thread):
    """Lets the cleanup of a failed attempt meet a locked repository: the first restic
    whose argv holds every needle (the manifest's waiting restic) is SIGKILLed; the
    next one (its replacement, started after the dump snapshot was saved) is frozen
    before it can take its lock, a live exclusive lock is taken (``restic key
    passwd`` waiting for input), then the replacement is let go: it finds the
    repository locked, and so does the ``forget`` of the cleanup."""

    def __init__(self, repo: restic.Repo, needles: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.repo, self.needles = repo, needles
        self.killed: int | None = None
        self.frozen: int | None = None
        self.holder: subprocess.Popen | None = None
        self.stop = threading.Event()

    def _ours(self, pid: int) -> bool:
        """A restic of this repository (not one of another test session's)."""
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return f"RESTIC_REPOSITORY={self.repo.url}".encode() in f.read().split(b"\0")
        except OSError:
            return False

    def _next(self, seen: set[int]) -> int | None:
        while not self.stop.is_set():
            for pid, argv in process_argvs(own=True):
                if pid not in seen and all(any(n in a for a in argv) for n in self.needles) \
                        and self._ours(pid):
                    return pid
            time.sleep(0.002)
        return None

    def run(self) -> None:
        first = self._next(set())
        if first is None:
            return
        try:  # killed once it waits for the manifest (lock taken, the dump streaming)
            while not waiting_on_stdin(first):
                if self.stop.is_set():
                    return
                time.sleep(0.002)
            os.kill(first, signal.SIGKILL)
        except OSError:  # it died on its own: the fault is not injected (the test says so)
            return
        self.killed = first
        second = self._next({first})
        if second is None:
            return
        os.kill(second, signal.SIGSTOP)
        self.frozen = second
        try:
            self.holder = _hold_lock(self.repo, (*self.repo.base_argv(), "key", "passwd"))
        finally:
            os.kill(second, signal.SIGCONT)

    def release(self) -> None:
        self.stop.set()
        if self.holder is not None and self.holder.poll() is None:
            self.holder.stdin.close()  # empty new password: restic refuses, unlocks
            self.holder.wait(60)


def test_failed_attempt_whose_forget_meets_a_locked_repo_is_recorded_and_swept_first(
        lab, big, tmp_path, caplog):
    from labkeeper import status

    inv_data = yaml.safe_load(big.read_text())
    inv_data["settings"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv_data, sort_keys=False))
    inv = load_inventory(path)
    repo = _repo(path)
    store = pg_backup.pending_store(inv, BIG)
    fault = FreezeThenLock(repo, [b"restic", f"{BIG}.manifest.json".encode()])
    fault.start()
    caplog.set_level(logging.INFO, logger="labkeeper")
    try:
        with pytest.raises(pg_backup.BackupFailed) as failed:
            pg_backup.backup_database(inv, BIG)
            raise AssertionError(f"the backup succeeded: {fault.__dict__} {caplog.messages}")
    finally:
        fault.stop.set()
        fault.join(60)
    try:
        assert fault.killed and fault.frozen and fault.holder is not None, \
            "the fault was not injected"
        bid = failed.value.backup_id
        assert "storing the manifest failed" in str(failed.value), failed.value
        assert "could not list/forget snapshots" in str(failed.value)
        assert f"recorded attempt {bid} as pending cleanup" in str(failed.value)
        assert [a.backup_id for a in store.read()] == [bid]
        # the fault is real: the attempt's dump is in the series, without its manifest
        left = restic.find_snapshots(repo, tags=[pg_backup.backup_tag(bid)], host="local-lab")
        assert [s.tags for s in left] == [
            [*pg_backup.series_tags("127.0.0.1", BIG), pg_backup.backup_tag(bid)]]
        # ... and counts as a backup nowhere: drill/restore selection, status
        latest = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1",
                                              name=BIG)
        assert latest is None or latest.backup_id != bid
        snaps = restic.snapshots(repo, tags=("labkeeper",))
        row = next(r for r in status.evaluate(inv, status.Facts(
            now=datetime.now(UTC), snapshots={"lab-repo": snaps})) if r.target == BIG)
        assert row.last is None or row.last < left[0].time
    finally:
        fault.release()
    # the repository is usable again: the next backup sweeps the attempt first
    caplog.clear()
    result = pg_backup.backup_database(inv, BIG)
    assert any(f"swept earlier failed attempt {bid}" in n and left[0].id in n
               for n in result.notes), result.notes
    assert restic.find_snapshots(repo, tags=[pg_backup.backup_tag(bid)], host="local-lab") == []
    assert store.read() == [] and not store.path.exists()
    assert result.pending_left == 0 and result.row()["status"] == "ok"


# -- locks --------------------------------------------------------------------------------

def _hold_lock(repo: restic.Repo, argv: tuple[str, ...]) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **repo.env()})
    deadline = time.monotonic() + 30
    while not [lk for lk in _locks(repo) if lk.pid == proc.pid]:
        assert time.monotonic() < deadline, "restic took no lock"
        time.sleep(0.2)
    return proc


def _dead_run_lock(repo: restic.Repo, argv: tuple[str, ...]) -> int:
    """A restic run that died holding its lock: returns the dead PID."""
    holder = _hold_lock(repo, argv)
    holder.kill()
    holder.wait()
    assert [lk for lk in _locks(repo) if lk.pid == holder.pid]
    return holder.pid


@pytest.mark.restic_matrix
def test_stale_exclusive_lock_of_a_dead_run_is_removed_with_unlock_and_the_run_says_so(
        lab, big, caplog):
    repo = _repo(big)
    dead = _dead_run_lock(repo, (*repo.base_argv(), "key", "passwd"))  # exclusive
    caplog.set_level(logging.INFO, logger="labkeeper")
    result = pg_backup.backup_database(load_inventory(big), "photos")
    said = caplog.messages
    assert any("removed stale exclusive lock" in m and str(dead) in m for m in said), said
    assert any(str(dead) in n for n in result.notes)
    assert not [lk for lk in _locks(repo) if lk.pid == dead]
    assert _series(repo, "photos")[-1].id == result.snapshot_id


@pytest.mark.restic_matrix
def test_stale_shared_lock_of_a_dead_run_neither_blocks_the_backup_nor_the_maintenance(
        lab, big, caplog):
    # A shared lock blocks no backup, so the backup spends no restic run looking for
    # it; the maintenance (which needs an exclusive lock) removes it and says so.
    repo = _repo(big)
    dead = _dead_run_lock(repo, (*repo.base_argv(), "backup", "--stdin", "--stdin-filename",
                                 "dead-run.sql", "--host", "local-lab"))
    result = pg_backup.backup_database(load_inventory(big), "photos")
    assert result.snapshot_id and result.notes == []
    caplog.set_level(logging.INFO, logger="labkeeper")
    restic.wait_for_locks(repo, exclusive=True, wait=30, stale_after=3600)
    said = caplog.messages
    assert any("removed stale shared lock" in m and str(dead) in m for m in said), said
    assert _locks(repo) == []


@pytest.mark.restic_matrix
def test_live_exclusive_lock_is_waited_for_then_the_backup_runs(lab, big, caplog):
    repo = _repo(big)
    holder = _hold_lock(repo, (*repo.base_argv(), "key", "passwd"))  # exclusive, waits
    caplog.set_level(logging.INFO, logger="labkeeper")
    released_at: list[float] = []
    done = threading.Event()

    def waits_for_holder() -> bool:
        return any("waiting for exclusive lock" in m and f"pid {holder.pid} " in m
                   for m in caplog.messages)

    def release() -> None:  # once the backup says it waits for the holder's lock
        try:
            wait_until(lambda: done.is_set() or waits_for_holder(), timeout=300,
                       what="the backup to wait for the lock")
            if not done.is_set():
                released_at.append(time.monotonic())
        finally:
            holder.stdin.close()  # empty new password: restic refuses, releases its lock
            holder.wait()

    t = threading.Thread(target=release, daemon=True)
    t.start()
    try:
        result = pg_backup.backup_database(load_inventory(big), "photos")
    finally:
        done.set()
        t.join(120)
    assert waits_for_holder(), caplog.messages
    assert result.snapshot_id and released_at
    assert holder.returncode == 1


# -- what a run costs around its work (issue 24) ------------------------------------------

def _with_settings(inventory: Path, tmp_path: Path, **settings: object) -> Path:
    data = yaml.safe_load(inventory.read_text())
    data.setdefault("settings", {}).update(settings)
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.restic_matrix
def test_one_database_backup_starts_two_restics_and_names_both_snapshots_by_full_id(
        lab, big, tmp_path):
    # restic 0.14's summary names its snapshot by a short id. The full id comes from the
    # snapshot file that restic has just added to its cache, not from a `restic
    # snapshots` run after each of the two backups (~0.7 s each, one after the other).
    calls = tmp_path / "restic-calls"
    wrapper = tmp_path / "restic"
    real = shutil.which(restic.default_binary())
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    path = _with_settings(big, tmp_path, restic_binary=str(wrapper))
    result = pg_backup.backup_database(load_inventory(path), "photos")
    commands = [line.split() for line in calls.read_text().splitlines()]
    assert len(commands) == 2 and all("backup" in c and "--stdin" in c for c in commands), \
        commands
    repo = _repo(big)
    stored = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1",
                                          name="photos")
    assert stored is not None and stored.backup_id == result.backup_id
    assert result.snapshot_id == stored.dump.id and restic.is_full_id(result.snapshot_id)
    assert stored.manifest is not None and result.manifest_snapshot_id == stored.manifest.id
    assert restic.is_full_id(result.manifest_snapshot_id)
    manifest = pg_backup.read_manifest(repo, stored)
    assert manifest.dump is not None and manifest.dump.snapshot_id == stored.dump.id


def _task_spans(state) -> dict[str, tuple[datetime, datetime]]:
    """Task run name -> (start, end) of a finished flow run's task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def task_runs():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    def ended() -> dict[str, tuple[datetime, datetime]] | None:
        runs = asyncio.run(task_runs())  # task run states reach the API asynchronously
        if runs and all(t.start_time and t.end_time for t in runs):
            return {t.name: (t.start_time, t.end_time) for t in runs}
        return None

    return wait_until(ended, timeout=30, what="the task runs to reach the API", every=0.2)


def test_globals_are_checked_alongside_the_backup_and_stored_after_it_only_when_changed(
        lab, big, tmp_path, prefect_harness):
    # Unchanged globals cost no restic run and no time of their own: the check (psql and
    # an in-memory pg_dumpall) runs beside the database's backup. Changed globals are
    # stored after it (a restic ending beside another restic's start costs 0.14 a
    # 45-95 s lock-load retry).
    path = _with_settings(big, tmp_path, state_dir=str(tmp_path / "state"))
    label = pg_backup.server_label(load_inventory(path), load_inventory(path).database("photos"))

    def run() -> tuple[dict[str, dict], dict[str, tuple[datetime, datetime]]]:
        state = pg_backup_flow(lab=str(path), databases=["photos"], return_state=True)
        assert state.is_completed(), state.message
        return {r["database"]: r for r in state.result()}, _task_spans(state)

    rows, spans = run()  # a new state directory: no record of a stored globals dump
    check, backup, store = (spans[f"globals-check-{label}"], spans["backup-photos"],
                            spans[f"globals-{label}"])
    assert check[0] < backup[1] and backup[0] < check[1], f"not side by side: {spans}"
    assert store[0] >= backup[1], f"globals stored while the backup ran: {spans}"
    stored = rows[f"globals {label}"]
    assert stored["snapshot"] and "unchanged" not in stored["notes"]

    rows, spans = run()
    assert f"globals-{label}" not in spans, f"unchanged globals stored again: {spans}"
    check, backup = spans[f"globals-check-{label}"], spans["backup-photos"]
    assert check[0] < backup[1] and backup[0] < check[1], f"not side by side: {spans}"
    again = rows[f"globals {label}"]
    assert again["snapshot"] == stored["snapshot"] and "unchanged since" in again["notes"]
    assert rows["photos"]["status"] == "ok"
