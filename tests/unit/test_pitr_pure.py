"""PITR's pure parts: LSNs and segments, stream gates, base/WAL selection, retention,
the recovery log, lag warnings, the inventory section."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from labkeeper.inventory import parse_inventory, validate_text
from labkeeper.inventory.pitr import PitrServer
from labkeeper.pitr import PitrError, drill, lag, models, restore, retention, scratch
from labkeeper.pitr import wal as wal_mod
from labkeeper.pitr.target import complete_bases, coverage, lsn_range_tag, wal_batches
from labkeeper.restic import Snapshot

T0 = datetime(2026, 12, 5, 2, 0, tzinfo=UTC)
MANIFEST_END = (b'"WAL-Ranges": [\n{ "Timeline": 1, "Start-LSN": "0/2000028", '
                b'"End-LSN": "0/2000100" }\n],\n"Manifest-Checksum": "' + b"a" * 64 + b'"}\n')


def seg(n: int, tli: int = 1) -> str:
    return models.segment_name(tli, n)


def snap(i: int, tags: list[str], minutes: int = 0) -> Snapshot:
    return Snapshot(id=f"{i:064x}", time=T0 + timedelta(minutes=minutes), tags=tags)


def base(i: int, bid: str, start: int, end: int, minutes: int) -> list[Snapshot]:
    rng = lsn_range_tag(1, models.format_lsn(start * models.SEGMENT_SIZE + 40),
                        models.format_lsn(end * models.SEGMENT_SIZE + 256))
    return [snap(i, [*models.base_tags("pg1"), f"backup:{bid}"], minutes),
            snap(i + 1, [*models.base_info_tags("pg1"), f"backup:{bid}", rng], minutes + 1)]


def wal(i: int, first: int, last: int, minutes: int) -> Snapshot:
    return snap(i, [*models.wal_tags("pg1", seg(first), seg(last)), f"backup:w{i}"], minutes)


# -- LSNs, segments ----------------------------------------------------------------------

def test_lsn_round_trips_and_maps_to_its_segment_name() -> None:
    lsn = models.parse_lsn("1/A3000028")
    assert models.format_lsn(lsn) == "1/A3000028"
    assert models.segment_of_lsn(1, lsn) == "0000000100000001000000A3"
    assert models.parse_segment("0000000100000001000000A3") == (1, 256 + 0xA3)


def test_a_malformed_lsn_is_refused() -> None:
    with pytest.raises(ValueError, match="not a WAL location"):
        models.parse_lsn("0/XYZ")


def test_partial_segments_are_not_wal_files_to_ship() -> None:
    assert models.is_wal_file(seg(3)) and models.is_wal_file("00000002.history")
    assert not models.is_wal_file(seg(3) + ".partial")


def test_first_gap_names_the_first_missing_segment() -> None:
    assert models.first_gap([seg(2), seg(3), seg(5)], seg(2)) == seg(4)
    assert models.first_gap([seg(2), seg(3)], seg(2)) is None
    assert models.first_gap([seg(3)], seg(2)) == seg(2)


def test_first_gap_follows_a_timeline_switch() -> None:
    assert models.first_gap([seg(2), seg(3), seg(3, 2), seg(4, 2)], seg(2)) is None


# -- stream gates --------------------------------------------------------------------------

def complete_tar(body: bytes) -> bytes:
    pad = (-len(body)) % 512
    return body + b"\0" * (pad + 1024)


def test_basebackup_gate_accepts_a_stream_ending_with_the_manifest_and_end_blocks() -> None:
    data = complete_tar(b"x" * 512 + MANIFEST_END)
    assert models.basebackup_tail_problem(data[-4096:], len(data)) is None
    assert models.parse_wal_ranges(MANIFEST_END.decode()) == [
        models.WalRange(1, "0/2000028", "0/2000100")]


def test_basebackup_gate_refuses_a_stream_cut_inside_the_manifest() -> None:
    cut = complete_tar(b"x" * 512 + MANIFEST_END[:-40])
    assert "manifest" in (models.basebackup_tail_problem(cut[-4096:], len(cut)) or "")


def test_basebackup_gate_refuses_a_stream_without_end_of_archive() -> None:
    data = complete_tar(b"x" * 512 + MANIFEST_END)[:-1024]
    assert "end-of-archive" in (models.basebackup_tail_problem(data[-4096:], len(data)) or "")


def test_tar_gate_refuses_a_stream_of_partial_blocks() -> None:
    assert models.tar_tail_problem(b"\0" * 1000, 1000) is not None
    assert models.tar_tail_problem(b"\0" * 1024, 2048) is None


# -- choosing what to restore ----------------------------------------------------------

def test_complete_bases_ignore_a_tar_without_its_info_snapshot() -> None:
    snaps = [*base(1, "a", 2, 2, 0), snap(9, [*models.base_tags("pg1"), "backup:b"], 30)]
    assert [b.backup_id for b in complete_bases(snaps)] == ["a"]


def test_newest_base_backup_that_finished_before_the_target_is_chosen() -> None:
    bases = complete_bases([*base(1, "a", 2, 2, 0), *base(3, "b", 9, 9, 60)])
    at = restore.RecoveryTarget("time", time=T0 + timedelta(minutes=30))
    assert restore.choose_base(bases, at).backup_id == "a"
    late = restore.RecoveryTarget("time", time=T0 + timedelta(minutes=90))
    assert restore.choose_base(bases, late).backup_id == "b"
    with pytest.raises(PitrError, match="no base backup finished before"):
        restore.choose_base(bases, restore.RecoveryTarget("time", time=T0))


def test_wal_plan_takes_the_batches_from_the_base_backups_start() -> None:
    b = complete_bases(base(1, "a", 4, 4, 0))[0]
    batches = wal_batches([wal(10, 1, 3, 1), wal(11, 4, 6, 5), wal(12, 7, 9, 10)])
    plan = restore.plan_wal(b, batches, restore.RecoveryTarget("latest"))
    assert [w.first for w in plan.batches] == [seg(4), seg(7)]
    assert plan.names == [seg(n) for n in range(4, 10)] and plan.gap is None


def test_wal_plan_for_latest_fails_naming_a_missing_segment() -> None:
    b = complete_bases(base(1, "a", 4, 4, 0))[0]
    batches = wal_batches([wal(11, 4, 6, 5), wal(12, 8, 9, 10)])
    with pytest.raises(PitrError, match=f"WAL segment {seg(7)} is missing"):
        restore.plan_wal(b, batches, restore.RecoveryTarget("latest"))
    at = restore.RecoveryTarget("time", time=T0 + timedelta(minutes=6))
    assert restore.plan_wal(b, batches, at).gap == seg(7)


def test_wal_plan_fails_when_the_base_backups_own_wal_is_missing() -> None:
    b = complete_bases(base(1, "a", 4, 5, 0))[0]
    with pytest.raises(PitrError, match=f"WAL segment {seg(5)} is missing"):
        restore.plan_wal(b, wal_batches([wal(11, 4, 4, 5)]), restore.RecoveryTarget("latest"))


def test_targets_parse_as_time_lsn_or_latest() -> None:
    assert restore.parse_target("0/3000060").kind == "lsn"
    assert restore.parse_target("latest").kind == "latest"
    t = restore.parse_target("2026-12-05T14:05:00")
    assert t.kind == "time" and t.time == datetime(2026, 12, 5, 14, 5, tzinfo=UTC)
    with pytest.raises(PitrError, match="expected an ISO time"):
        restore.parse_target("yesterday")


# -- the recovery log ------------------------------------------------------------------------

LOG_REACHED = """\
2026-12-05 03:23:30.1 UTC [1] LOG:  starting point-in-time recovery to 2026-12-05 03:23:27+00
2026-12-05 03:23:30.2 UTC [1] LOG:  restored log file "000000010000000000000005" from archive
2026-12-05 03:23:30.3 UTC [1] LOG:  recovery stopping before commit of transaction 812, \
time 2026-12-05 03:23:27.05+00
2026-12-05 03:23:30.3 UTC [1] LOG:  redo done at 0/5001A28 system usage: CPU: user: 0.00 s
2026-12-05 03:23:30.3 UTC [1] LOG:  last completed transaction was at log time \
2026-12-05 03:23:26.99+00
2026-12-05 03:23:30.5 UTC [1] LOG:  database system is ready to accept connections
"""


def test_recovery_log_reports_where_recovery_stopped() -> None:
    out = restore.parse_recovery_log(LOG_REACHED)
    assert out.state == "reached"
    assert out.stopped == "recovery stopping before commit of transaction 812"
    assert out.stop_time == "2026-12-05 03:23:27.05+00"
    assert out.last_commit_time == "2026-12-05 03:23:26.99+00"
    at = restore.RecoveryTarget("time", time=datetime(2026, 12, 5, 3, 23, 27, tzinfo=UTC))
    assert drill.stop_problem(out, at) is None
    early = restore.RecoveryTarget("time", time=datetime(2026, 12, 5, 3, 23, 26, tzinfo=UTC))
    assert "after the target" in (drill.stop_problem(out, early) or "")


def test_recovery_log_reports_a_recovery_that_ended_short_of_its_target() -> None:
    text = ("LOG:  starting point-in-time recovery\n"
            "FATAL:  recovery ended before configured recovery target was reached\n"
            "LOG:  startup process (PID 9) exited with exit code 1\n")
    out = restore.parse_recovery_log(text)
    assert out.state == "failed" and "recovery ended before" in out.error


def test_recovery_settings_never_listen_on_the_network() -> None:
    text = restore.recovery_settings(port=5999, sockdir=Path("/s"), waldir=Path("/w"),
                                     target=restore.parse_target("0/3000060"))
    assert "listen_addresses = ''" in text and "recovery_target_lsn = '0/3000060'" in text
    assert "restore_command = 'cp \"/w/%f\" \"%p\"'" in text


# -- retention -------------------------------------------------------------------------------

def test_retention_keeps_the_wal_of_the_oldest_kept_base_backup() -> None:
    snaps = [*base(1, "a", 2, 2, 0), *base(3, "b", 10, 10, 60), *base(5, "c", 20, 20, 120),
             wal(10, 2, 5, 10), wal(11, 6, 10, 50), wal(12, 11, 19, 100), wal(13, 20, 22, 130)]
    plan = retention.plan(snaps, keep=2, now=T0 + timedelta(hours=3))
    assert plan.keep_bases == ["b", "c"]
    forgotten = {s.id for s in plan.forget}
    assert forgotten == {snaps[0].id, snaps[1].id, snaps[6].id}
    # the batch 6..10 holds the start segment of "b": kept whole
    assert snaps[7].id not in forgotten


def test_retention_forgets_nothing_without_a_complete_base_backup() -> None:
    plan = retention.plan([wal(10, 2, 5, 10)], keep=1, now=T0)
    assert plan.forget == [] and "nothing is forgotten" in plan.reasons[0]


# -- lag warnings ----------------------------------------------------------------------------

CFG = PitrServer(name="pg1", database="appdb")


def test_inactive_slot_and_old_wal_are_warned_about() -> None:
    facts = lag.LagFacts(server="pg1", current_lsn="0/9000000", slot_exists=True,
                         slot_active=False, retained_bytes=3 * 1024 ** 3,
                         newest_wal_in_repo=T0, newest_base_in_repo=T0)
    warnings = lag.judge(facts, CFG, now=T0 + timedelta(minutes=30))
    text = "\n".join(warnings)
    assert "inactive" in text and "3072 MiB" in text and "RPO 15 min" in text


def test_a_healthy_archive_has_no_warnings() -> None:
    facts = lag.LagFacts(server="pg1", current_lsn="0/9000000", slot_exists=True,
                         slot_active=True, retained_bytes=1024, newest_wal_in_repo=T0,
                         newest_base_in_repo=T0)
    assert lag.judge(facts, CFG, now=T0 + timedelta(minutes=4)) == []


def test_a_missing_slot_is_warned_about() -> None:
    facts = lag.LagFacts(server="pg1", current_lsn="0/9000000")
    assert any("does not exist" in w for w in lag.judge(facts, CFG, now=T0))


# -- inventory -------------------------------------------------------------------------------

INV = """\
version: 1
lab: {name: t}
repositories:
  - {name: r, url: /srv/restic, password: "env:RP"}
databases:
  - {name: appdb, host: db1}
pitr:
  - name: pg1
    database: appdb
    ship_interval_minutes: 5
    retention: {keep_base_backups: 2}
"""


def test_inventory_accepts_a_pitr_section_with_defaults() -> None:
    assert validate_text(INV) == []
    server = parse_inventory(INV).pitr[0]
    assert server.slot_name == "labkeeper_pg1" and server.base_schedule == "0 3 * * 0"


def test_inventory_refuses_an_unknown_pitr_key_and_a_bad_slot_name() -> None:
    problems = validate_text(INV + "    slot: Bad-Slot\n    shipping: 5\n")
    text = "\n".join(str(p) for p in problems)
    assert "pitr[0].slot" in text and "shipping" in text, text


def test_a_restore_never_goes_into_a_directory_holding_anything(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "PG_VERSION").write_text("15\n")
    with pytest.raises(PitrError, match="not empty"):
        scratch.new_workdir(tmp_path / "data")
    assert scratch.new_workdir(tmp_path / "fresh").is_dir()


def test_doctor_plans_a_pitr_check_per_server_and_fails_without_a_slot() -> None:
    from labkeeper.doctor import CheckSpec, plan_checks

    assert CheckSpec("pitr", "pg1") in plan_checks(parse_inventory(INV))
    facts = lag.LagFacts(server="pg1", current_lsn="0/9000000")
    status, detail = lag.doctor_status(facts, lag.judge(facts, CFG, now=T0))
    assert status == "fail" and "does not exist" in detail


def test_an_idle_servers_switched_segment_counts_as_arrived_once_the_receiver_is_past_it(
        ) -> None:
    assert wal_mod.segment_arrived(seg(4), [], seg(5) + ".partial")
    assert not wal_mod.segment_arrived(seg(5), [], seg(5) + ".partial")
    assert wal_mod.segment_arrived(seg(5), ["00000001.history", seg(5)], None)
    assert not wal_mod.segment_arrived(seg(6), [seg(5)], seg(6) + ".partial")


def test_archive_covers_a_time_target_only_up_to_the_last_closed_segment() -> None:
    shipped = snap(20, [*models.wal_tags("pg1", seg(4), seg(6),
                                         covered_until=(T0 + timedelta(minutes=5)).timestamp())])
    reach = coverage([wal(11, 2, 3, 1), shipped])
    at = restore.RecoveryTarget("time", time=T0 + timedelta(minutes=4))
    assert restore.archive_covers(reach, at) == T0 + timedelta(minutes=5)
    later = restore.RecoveryTarget("time", time=T0 + timedelta(minutes=6))
    assert restore.archive_covers(reach, later) is None
    assert restore.archive_covers(reach, restore.RecoveryTarget("latest")) is None
    idle = snap(21, models.walmark_tags("pg1", (T0 + timedelta(minutes=9)).timestamp()))
    assert restore.archive_covers(coverage([shipped, idle]), later) == T0 + timedelta(minutes=9)


def test_retention_keeps_only_the_newest_archive_mark() -> None:
    marks = [snap(30 + i, models.walmark_tags("pg1", (T0 + timedelta(minutes=i)).timestamp()),
                  minutes=i) for i in range(3)]
    plan = retention.plan([*base(1, "a", 2, 2, 0), *marks], keep=1, now=T0)
    assert {s.id for s in plan.forget} == {marks[0].id, marks[1].id}
