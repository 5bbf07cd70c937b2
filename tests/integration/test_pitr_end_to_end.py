"""PITR for real: PostgreSQL 15, pg_basebackup / pg_receivewal, restic 0.14, moto S3.

One scenario, in order: a writer commits timestamped rows; the receiver runs (and is
killed once); a base backup is taken (one killed mid-stream first); WAL is shipped
(once while S3 is frozen); then restores to a time between two commits and to an LSN;
last, a WAL batch is forgotten and the restore names the missing segment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from labkeeper import pg_backup, restic, status
from labkeeper.doctor import CheckSpec, run_check
from labkeeper.pitr import (
    PitrError,
    basebackup,
    crosscheck,
    drill,
    models,
    restore,
    retention,
    wal,
)
from labkeeper.pitr.target import complete_bases, coverage, list_server, wal_batches
from tests.fixtures.procs import parent_pid, process_argvs
from tests.integration.pitr_support import DB, PitrLab, Receiver, Writer, start_pitr_lab, wait_until


@pytest.fixture
def restore_dir() -> Iterator[Path]:
    """Outside pytest's 0700 base directory (which every pytest session on the machine
    resets), so the postgres user can reach the restored cluster."""
    path = Path(tempfile.mkdtemp(prefix="labkeeper-pitr-test-"))
    yield path / "restore"
    shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Scenario:
    plab: PitrLab
    receiver: Receiver
    writer: Writer
    base: basebackup.BaseBackupResult | None = None
    ships: list[wal.ShipResult] = dataclasses.field(default_factory=list)


@pytest.fixture(scope="module")
def scenario() -> Iterator[Scenario]:
    workdir = Path(tempfile.mkdtemp(prefix="labkeeper-pitr-"))  # see restore_dir
    plab = start_pitr_lab(workdir)
    sc = Scenario(plab, Receiver(plab).start(), Writer(plab).start())
    try:
        yield sc
    finally:
        sc.writer.stop()  # (a test may have replaced it)
        sc.receiver.stop()
        plab.lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _pids(name: bytes) -> list[int]:
    """Our own children running ``name`` (never another session's processes)."""
    return [pid for pid, argv in process_argvs()
            if argv[0].endswith(name) and parent_pid(pid) == os.getpid()]


def _interrupted_base_backup(scenario: Scenario, interrupt: Callable[[], object]) -> None:
    """A slowed base backup (--max-rate) is interrupted while restic reads its stream:
    it fails, and no base backup snapshot of it is left in the repository."""
    t = scenario.plab.target()
    slow = dataclasses.replace(t, server=t.server.model_copy(update={"max_rate_kb": 512}))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            basebackup.run_base_backup(slow)
        except BaseException as exc:
            errors.append(exc)

    th = threading.Thread(target=run)
    th.start()
    wait_until(lambda: _pids(b"pg_basebackup"), 60, "pg_basebackup to start")
    wait_until(restic_reading, 60, "restic to read the stream")
    interrupt()
    th.join(120)
    assert errors and isinstance(errors[0], PitrError), errors
    assert "pg_basebackup" in str(errors[0]) and "no snapshot was finalised" in str(errors[0])
    snaps = list_server(t)
    assert not [s for s in snaps if "kind:basebackup" in s.tags], "a cut stream was kept"


def test_killed_pg_basebackup_leaves_no_base_backup_counted(scenario: Scenario) -> None:
    def kill() -> None:
        for pid in _pids(b"pg_basebackup"):
            os.kill(pid, signal.SIGKILL)

    _interrupted_base_backup(scenario, kill)


def test_cut_base_backup_connection_leaves_no_base_backup_counted(scenario: Scenario) -> None:
    def cut() -> None:
        got = scenario.plab.pg.psql_super(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE backend_type = 'walsender' AND query LIKE 'BASE_BACKUP%';")
        assert got.strip() == "1", got

    _interrupted_base_backup(scenario, cut)


def restic_reading() -> bool:
    return bool(_pids(b"restic"))


def test_base_backup_records_timeline_and_lsns(scenario: Scenario, caplog) -> None:
    caplog.set_level(logging.INFO, logger="labkeeper")
    scenario.writer.wait_rows(5)
    res = basebackup.run_base_backup(scenario.plab.target())
    scenario.base = res
    assert res.timeline == 1
    assert (f"pg1: base backup {restic.short_id(res.snapshot_id)} ({res.bytes} bytes), "
            f"timeline 1, WAL {res.start_lsn} .. {res.end_lsn}") in caplog.messages
    assert models.parse_lsn(res.start_lsn) < models.parse_lsn(res.end_lsn)
    bases = complete_bases(list_server(scenario.plab.target()))
    assert [b.backup_id for b in bases] == [res.backup_id]
    assert bases[0].start_lsn == res.start_lsn and bases[0].end_lsn == res.end_lsn


def test_killed_receiver_is_restarted_and_the_slot_keeps_the_wal(scenario: Scenario,
                                                                caplog) -> None:
    caplog.set_level(logging.INFO, logger="labkeeper")
    sup = scenario.receiver.sup
    first = sup.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    scenario.writer.wait_rows(10)  # WAL written while no receiver runs
    second = wait_until(lambda: sup.pid not in (None, first) and sup.pid,
                        60, "the receiver to be restarted")
    assert sup.state.starts >= 2
    # the supervisor says why and when it restarts, and passes pg_receivewal's own lines on
    said = caplog.messages
    assert any(m.startswith("pg1: pg_receivewal exited ") for m in said), said
    assert any(re.fullmatch(r"pg1: restarting pg_receivewal in [12] s", m) for m in said), said
    assert any(m.startswith(f"pg1: pg_receivewal started (pid {second}) into ") for m in said)
    wait_until(lambda: any(r.name == "labkeeper.pitr.wal" and "starting log streaming at"
                           in r.getMessage() for r in caplog.records),
               60, "pg_receivewal's stderr in the log")
    scenario.ships.append(wal.ship(scenario.plab.target()))
    assert scenario.ships[-1].files, "nothing was shipped"


def test_frozen_s3_keeps_segments_in_the_spool_and_a_later_ship_sends_them(
        scenario: Scenario) -> None:
    t = scenario.plab.target()
    scenario.writer.wait_rows(10)
    moto = scenario.plab.lab.s3.pid  # type: ignore[union-attr]
    assert moto is not None
    os.kill(moto, signal.SIGSTOP)
    thaw = threading.Timer(12.0, os.kill, (moto, signal.SIGCONT))
    thaw.start()
    try:
        with pytest.raises(PitrError, match="stay in the spool"):
            wal.ship(t, stall_timeout=4)
    finally:
        thaw.join()
        os.kill(moto, signal.SIGCONT)
    waiting = wal.ready_files(t.spool)
    assert waiting, "the spool was emptied although nothing was shipped"
    shipped = wal.ship(t, switch=False)
    scenario.ships.append(shipped)
    assert set(waiting) <= set(shipped.files)
    assert not (set(waiting) & set(wal.ready_files(t.spool)))


def test_restore_to_a_time_between_two_commits_has_every_row_before_and_none_after(
        scenario: Scenario, restore_dir: Path) -> None:
    scenario.writer.wait_rows(10)
    t = scenario.plab.target()
    rows = list(scenario.writer.rows)  # committed before the ship closes the segment
    scenario.ships.append(wal.ship(t))
    assert scenario.base is not None
    # a commit well after the base backup, and the one after it
    k = len(rows) - 3
    (_id_k, _at_k), (id_next, at_next) = rows[k], rows[k + 1]
    to = restore.RecoveryTarget("time", time=at_next - timedelta(microseconds=1))
    res = restore.restore_pitr(t, to, restore_dir, timeout=300)
    try:
        assert res.cluster is not None
        got = [int(r[0]) for r in res.cluster.query("SELECT id FROM ticks ORDER BY id", db=DB)]
    finally:
        assert res.cluster is not None
        res.cluster.destroy()
    before = [i for i, _at in rows if i < id_next]
    assert got == before
    assert res.outcome.stopped.startswith("recovery stopping before commit")


def test_restore_to_a_quiet_moment_after_the_last_commit_has_every_row(
        scenario: Scenario, restore_dir: Path) -> None:
    """No commit between the last one and the target: PostgreSQL alone would refuse
    ("recovery ended before configured recovery target was reached")."""
    t = scenario.plab.target()
    scenario.writer.stop()
    rows = list(scenario.writer.rows)
    quiet = datetime.now(tz=UTC)
    wait_until(lambda: datetime.now(tz=UTC) > quiet + timedelta(seconds=1), 10, "a quiet second")
    scenario.ships.append(wal.ship(t))
    reach = coverage(list_server(t))
    assert reach is not None and reach > quiet
    # Marks have whole-second resolution: a second ship within the same second could not
    # show a later mark, so let that second pass first.
    wait_until(lambda: datetime.now(tz=UTC) >= reach + timedelta(seconds=1), 10,
               "the next whole second")
    again = wal.ship(t)  # nothing (or only a little) new to ship
    later = coverage(list_server(t))
    assert later is not None and later > reach, again.notes
    scenario.writer = Writer(scenario.plab).start()
    res = restore.restore_pitr(t, restore.RecoveryTarget("time", time=quiet), restore_dir,
                               timeout=300)
    assert res.cluster is not None
    try:
        got = [int(r[0]) for r in res.cluster.query("SELECT id FROM ticks ORDER BY id", db=DB)]
    finally:
        res.cluster.destroy()
    assert got == [i for i, _at in rows]


def test_restore_to_an_lsn_stops_at_the_first_record_past_it(
        scenario: Scenario, restore_dir: Path) -> None:
    t = scenario.plab.target()
    committed = list(scenario.writer.rows)
    # the insert position: the lab runs synchronous_commit = off, so a commit the writer
    # saw may still be beyond pg_current_wal_lsn() (the write position)
    lsn = scenario.plab.sql("SELECT pg_current_wal_insert_lsn();")[0][0]
    scenario.writer.wait_rows(3)
    scenario.ships.append(wal.ship(t))
    res = restore.restore_pitr(t, restore.RecoveryTarget("lsn", lsn=lsn), restore_dir,
                               timeout=300)
    assert res.cluster is not None
    try:
        got = {int(r[0]) for r in res.cluster.query("SELECT id FROM ticks", db=DB)}
    finally:
        res.cluster.destroy()
    m = re.search(r'after WAL location \(LSN\) "([0-9A-F]+/[0-9A-F]+)"', res.outcome.stopped)
    assert m is not None, res.outcome
    stopped = models.parse_lsn(m.group(1))
    assert 0 <= stopped - models.parse_lsn(lsn) < 64 * 1024, res.outcome
    assert {i for i, _at in committed} <= got


def test_retention_never_forgets_wal_a_kept_base_backup_needs(scenario: Scenario) -> None:
    t = scenario.plab.target()
    second = basebackup.run_base_backup(t)
    scenario.writer.wait_rows(3)
    scenario.ships.append(wal.ship(t))
    keep_one = dataclasses.replace(t, server=t.server.model_copy(
        update={"retention": t.server.retention.model_copy(update={"keep_base_backups": 1})}))
    plan = retention.apply(keep_one)
    snaps = list_server(t)
    bases = complete_bases(snaps)
    assert [b.backup_id for b in bases] == [second.backup_id]
    need = models.parse_segment(bases[0].start_segment)[1]
    kept = wal_batches(snaps)
    assert all(models.parse_segment(w.last)[1] >= need for w in kept)
    assert any(models.parse_segment(w.first)[1] <= need for w in kept), \
        "the batch holding the kept base backup's start segment was forgotten"
    assert plan.forget, "retention forgot nothing although an older base backup existed"


def test_drill_restores_a_random_moment_and_the_newest_within_objectives(
        scenario: Scenario, restore_dir: Path) -> None:
    t = scenario.plab.target()
    scenario.ships.append(wal.ship(t))
    res = drill.run_drill(t, seed=7, workdir=restore_dir, timeout=300)
    assert [r.status for r in res.rows] == ["ok", "ok"], [r.detail for r in res.rows]
    assert res.rows[0].target != "latest" and res.rows[1].target == "latest"
    assert res.ok, res.breaches
    assert res.rpo_s is not None and res.rpo_s < 60


def test_a_restore_to_a_dumps_wal_lsn_agrees_with_its_manifest_and_a_difference_is_said(
        scenario: Scenario, restore_dir: Path) -> None:
    """The nightly dump records its snapshot's WAL LSN; the drill restores to it and
    counts: the real manifest agrees; one whose count differs is reported, not passed."""
    t = scenario.plab.target()
    if not complete_bases(list_server(t)):  # (when run alone)
        basebackup.run_base_backup(t)
    scenario.writer.stop()  # no commit between the dump's snapshot and its LSN
    try:
        pg_backup.backup_database(scenario.plab.inv, DB)
    finally:
        scenario.writer = Writer(scenario.plab).start()
    dumped = datetime.now(tz=UTC)
    scenario.writer.wait_rows(3)
    # A ship's walto: mark has whole-second resolution (it claims no more than it knows):
    # ship in a later second than the dump's snapshot, so the mark provably covers it.
    wait_until(lambda: datetime.now(tz=UTC) >= dumped + timedelta(seconds=1), 10,
               "the next whole second after the dump")
    scenario.ships.append(wal.ship(t))
    [ref] = crosscheck.newest_dumps(scenario.plab.inv, "pg1")
    assert ref.manifest.wal_lsn, ref.manifest
    snaps = list_server(t)
    bases, covered = complete_bases(snaps), coverage(snaps)
    same = drill.cross_check(t, ref, bases, covered, restore_dir / "same",
                             timeout=300)
    assert same.status == "ok" and "agrees" in same.detail, same.detail
    ticks = [x.model_copy(update={"rows": x.rows - 1}) if x.name == "ticks" else x
             for x in ref.manifest.tables]
    off = crosscheck.DumpRef(DB, ref.manifest.model_copy(update={"tables": ticks}))
    differs = drill.cross_check(t, off, bases, covered, restore_dir / "differs",
                                timeout=300)
    assert differs.status == "warn" and "public.ticks" in differs.detail, differs.detail
    assert "(dump: " in differs.detail and "+1)" in differs.detail, differs.detail

def test_dr_drill_runs_the_pitr_drill_of_each_pitr_server_against_its_objectives(
        scenario: Scenario, prefect_harness: None) -> None:
    from flows.dr_drill import dr_drill_flow

    t = scenario.plab.target()
    if not complete_bases(list_server(t)):  # (when run alone)
        basebackup.run_base_backup(t)
    scenario.writer.wait_rows(3)
    scenario.ships.append(wal.ship(t))
    rows = dr_drill_flow(target="pitr", lab=str(scenario.plab.workdir / "lab.yaml"))
    assert [(r["drill"], r["target"]) for r in rows] == [("pitr", "pg1")], rows
    row = rows[0]
    assert row["status"] == "passed", row
    assert row["rto objective"] != "-" and row["rpo objective"] != "-", row
    assert "latest" in row["source"], row

def test_base_backup_and_ship_flows_run_each_step_and_report_rows(
        scenario: Scenario, prefect_harness: None) -> None:
    from flows.pitr import pitr_base_backup_flow, pitr_wal_ship_flow

    lab = str(scenario.plab.workdir / "lab.yaml")
    scenario.writer.wait_rows(3)
    shipped = pitr_wal_ship_flow(lab=lab)
    assert [r["server"] for r in shipped] == ["pg1"] and shipped[0]["status"] == "ok"
    assert shipped[0]["files"] >= 1 and shipped[0]["warnings"] == "", shipped
    based = pitr_base_backup_flow(lab=lab)
    assert based[0]["status"] == "ok" and based[0]["timeline"] == 1, based
    bases = complete_bases(list_server(scenario.plab.target()))
    assert bases[-1].backup_id == based[0]["backup id"]


def test_wal_status_command_reports_an_active_slot_without_warnings(scenario: Scenario) -> None:
    result = CliRunner().invoke(app, ["wal", "status", "pg1", "--json",
                                      "--lab", str(scenario.plab.workdir / "lab.yaml")])
    facts = json.loads(result.stdout)
    assert facts["slot_active"] is True, facts
    assert facts["warnings"] == [] and result.exit_code == 0, facts
    check = run_check(scenario.plab.inv, CheckSpec("pitr", "pg1"))
    assert check.status == "ok", check


def test_status_reports_receive_slot_and_ship_rows_of_a_running_receiver(
        scenario: Scenario) -> None:
    t = scenario.plab.target()
    scenario.ships.append(wal.ship(t))
    rows = {r.target: r for r in status.evaluate(scenario.plab.inv,
                                                 status.gather(scenario.plab.inv))
            if r.section == "pitr"}
    assert rows["pg1 receive"].state == "ok", rows["pg1 receive"]
    assert rows["pg1 slot retention"].state == "ok", rows["pg1 slot retention"]
    assert "MiB retained" in rows["pg1 slot retention"].detail
    assert rows["pg1 ship"].state == "ok" and rows["pg1 ship"].last is not None

def _slot_active(scenario: Scenario) -> bool:
    slot = scenario.plab.target().server.slot_name
    rows = scenario.plab.sql("SELECT active FROM pg_replication_slots "
                             f"WHERE slot_name = '{slot}';")
    return bool(rows) and rows[0][0] == "t"


def test_serve_runs_wal_receive_as_a_child_restarts_it_and_stops_it_by_pid(
        scenario: Scenario, caplog, capfd) -> None:
    from deployments.serve import start_wal_receivers

    caplog.set_level(logging.INFO, logger="labkeeper")
    err: list[str] = []  # the children's stderr is serve's (here: captured fd 2)

    def child_said(text: str) -> bool:
        err.append(capfd.readouterr().err)
        return text in "".join(err)

    scenario.receiver.stop()
    wait_until(lambda: not _slot_active(scenario), 60, "the test receiver to let go")
    lab = str(scenario.plab.workdir / "lab.yaml")
    children = start_wal_receivers(scenario.plab.inv, lab)
    try:
        first = wait_until(lambda: children.pid("pg1"), 60, "wal receive to start")
        wait_until(lambda: _slot_active(scenario), 120, "the child's receiver on the slot")
        wait_until(lambda: child_said("pg1: pg_receivewal started (pid "), 60,
                   "wal receive's own line on serve's stderr")
        os.kill(first, signal.SIGKILL)  # dies: serve starts it again
        second = wait_until(lambda: (children.pid("pg1") or first) != first
                            and children.pid("pg1"), 60, "wal receive to be restarted")
        wait_until(lambda: _slot_active(scenario), 120, "the restarted receiver on the slot")
    finally:
        children.stop()
    assert children.pid("pg1") is None
    with pytest.raises(ProcessLookupError):
        os.kill(int(second), 0)
    said = caplog.messages
    assert f"wal receive pg1 started (pid {first})" in said, said
    assert f"wal receive pg1 (pid {first}) exited with -9; restarting in 1 s" in said, said
    assert f"wal receive pg1 started (pid {second})" in said, said
    assert any(m.startswith(f"wal receive pg1 (pid {second}) stopped: ") for m in said), said
    wait_until(lambda: not _slot_active(scenario), 60, "the receiver to stop with serve")
    scenario.receiver = Receiver(scenario.plab).start()

def test_a_missing_segment_in_the_repository_fails_the_restore_and_names_it(
        scenario: Scenario, restore_dir: Path) -> None:
    t = scenario.plab.target()
    for _ in range(3):
        scenario.writer.wait_rows(3)
        scenario.ships.append(wal.ship(t))
    snaps = list_server(t)
    start = models.parse_segment(complete_bases(snaps)[-1].start_segment)[1]
    later = [b for b in wal_batches(snaps) if models.parse_segment(b.first)[1] > start]
    assert len(later) >= 2
    gone = later[0]  # a gap, with WAL after it
    restic.forget_ids(t.repo, [gone.snapshot.id])
    with pytest.raises(PitrError, match=f"WAL segment {gone.first} is missing"):
        restore.restore_pitr(t, restore.RecoveryTarget("latest"), restore_dir,
                             timeout=300)
    res = drill.run_drill(t, seed=1, workdir=restore_dir.parent / "d",
                          timeout=300)
    assert not res.ok
    latest = res.rows[-1]
    assert latest.status == "failed" and f"WAL segment {gone.first} is missing" in latest.detail
