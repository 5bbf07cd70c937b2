"""The PITR drill's cross-check with the dumps' manifests (pure parts)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from labkeeper import drill as core
from labkeeper import pg_backup, postgres
from labkeeper.inventory import parse_inventory
from labkeeper.pitr import crosscheck, drill, restore
from labkeeper.pitr.target import StoredBase
from labkeeper.restic import Snapshot

T0 = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)


def manifest(lsn: str | None, rows: int = 10) -> pg_backup.Manifest:
    facts = postgres.SnapshotFacts(snapshot_id="00000003-000000BB-1", server_version="15.18",
                                   database_size=1, tables=(("public", "ticks", rows),),
                                   wal_lsn=lsn or "")
    return pg_backup.build_manifest(backup_id="b1", lab="lab", database="appdb", server="db1",
                                    dbname="appdb", facts=facts, dump_format="plain",
                                    compression="auto", pg_dump_version="15.18", now=T0)


def stored_base(end_lsn: str) -> StoredBase:
    s = Snapshot(id="a" * 64, time=T0 - timedelta(hours=1), tags=[])
    return StoredBase("base1", s, s, 1, "0/1000028", end_lsn)


def test_manifest_records_the_snapshots_wal_lsn_and_round_trips() -> None:
    back = pg_backup.parse_manifest(manifest("0/5A0001F8").to_json().decode())
    assert back.wal_lsn == "0/5A0001F8"


def test_a_manifest_written_before_lsns_were_recorded_still_parses() -> None:
    data = json.loads(manifest("0/5A0001F8").to_json())
    del data["wal_lsn"]
    assert pg_backup.parse_manifest(json.dumps(data)).wal_lsn is None


def test_a_dump_without_an_lsn_is_skipped_with_the_reason() -> None:
    why = crosscheck.infeasible(manifest(None), [stored_base("0/2000100")], T0)
    assert why is not None and "records no WAL LSN" in why


def test_a_dump_before_the_oldest_base_backup_is_skipped() -> None:
    why = crosscheck.infeasible(manifest("0/1800000"), [stored_base("0/2000100")], T0)
    assert why is not None and "no base backup ended before" in why


def test_a_dump_whose_lsn_the_shipped_wal_does_not_reach_is_skipped() -> None:
    m = manifest("0/5A0001F8")
    why = crosscheck.infeasible(m, [stored_base("0/2000100")], T0 - timedelta(seconds=1))
    assert why is not None and "does not reach" in why
    assert crosscheck.infeasible(m, [stored_base("0/2000100")], T0) is None


def test_matching_counts_agree_and_a_difference_is_reported_per_table() -> None:
    ref = crosscheck.DumpRef("appdb", manifest("0/5A0001F8", rows=10))
    assert crosscheck.judge(ref, {("public", "ticks"): 10})[0] == "ok"
    status, detail = crosscheck.judge(ref, {("public", "ticks"): 12, ("public", "new"): 0})
    assert status == "warn"
    assert "public.ticks 12 rows (dump: 10, +2)" in detail and "public.new exists" in detail


def test_a_restore_as_of_an_lsn_stops_before_the_record_at_it() -> None:
    to = restore.RecoveryTarget("lsn", lsn="0/5A0001F8", inclusive=False)
    text = restore.recovery_settings(port=5, sockdir=Path("/x"), waldir=Path("/x"),
                                     target=to)
    assert "recovery_target_lsn = '0/5A0001F8'" in text
    assert "recovery_target_inclusive = off" in text
    default = restore.recovery_settings(port=5, sockdir=Path("/x"), waldir=Path("/x"),
                                        target=restore.RecoveryTarget("lsn", lsn="0/5A0001F8"))
    assert "recovery_target_inclusive" not in default


def test_a_cross_check_that_differs_or_is_skipped_is_shown_but_does_not_fail_the_drill() -> None:
    res = drill.PitrDrillResult("pg1", rows=[drill.DrillRow("latest", "ok", ""),
                                             drill.DrillRow("dump a", "warn", "differs"),
                                             drill.DrillRow("dump b", "skipped", "no lsn")])
    assert res.ok
    res.rows.append(drill.DrillRow("dump c", "failed", "restore failed"))
    assert not res.ok



# -- the PITR drill as one of dr_drill's drills ---------------------------------------------

INV = """\
version: 1
lab: {name: t}
repositories:
  - {name: r, url: /srv/restic, password: "env:RP"}
databases:
  - {name: appdb, host: db1, drill: {enabled: true}}
pitr:
  - {name: pg1, database: appdb, objectives: {rpo_minutes: 15, rto_minutes: 10}}
"""


def test_dr_drill_plans_a_pitr_drill_for_every_pitr_server() -> None:
    inv = parse_inventory(INV, "t.yaml")
    assert ("pitr", "pg1") in core.plan_targets(inv, "all")
    assert core.plan_targets(inv, "pitr:pg1") == [("pitr", "pg1")]
    assert core.plan_targets(inv, "pitr") == [("pitr", "pg1")]
    assert core.plan_targets(inv, "pg1") == [("pitr", "pg1")]


def drill_result() -> core.DrillResult:
    return core.DrillResult("pitr", "pg1", rpo_objective_s=900, rto_objective_s=600)


def test_a_pitr_drill_within_objectives_passes_and_says_where_a_dump_differs() -> None:
    res = drill.PitrDrillResult("pg1", rows=[
        drill.DrillRow("2026-12-05T03:10:00+00:00", "ok", "stopped", 40.0),
        drill.DrillRow("latest", "ok", "end of WAL", 50.0),
        drill.DrillRow("dump appdb b1", "warn", "differs in 1 table(s): public.t", 45.0),
        drill.DrillRow("dump other b2", "skipped", "records no WAL LSN")],
        rpo_s=120.0, rto_s=50.0)
    result = drill_result()
    drill.fold(res, result)
    assert result.passed and result.rto_s == 50.0 and result.rpo_s == 120.0
    names = [c.name for c in result.checks]
    assert names[:3] == ["restore to 2026-12-05T03:10:00+00:00", "restore to latest",
                         "dump appdb b1"] and {"rto", "rpo"} <= set(names)
    notes = " | ".join(result.notes)
    assert "differs in 1 table(s)" in notes and "skipped: records no WAL LSN" in notes


def test_a_pitr_drill_over_its_rto_or_without_wal_fails() -> None:
    slow = drill.PitrDrillResult("pg1", rows=[drill.DrillRow("latest", "ok", "", 700.0)],
                                 rpo_s=60.0, rto_s=700.0)
    result = drill_result()
    drill.fold(slow, result)
    assert not result.passed and any("RTO" in b for b in result.breaches)
    empty = drill_result()
    drill.fold(drill.PitrDrillResult("pg1", rows=[drill.DrillRow("latest", "failed", "no base")]),
               empty)
    assert not empty.passed and "no WAL" in empty.error
