"""Pure parts of the PostgreSQL backup: gates, argv, tags, manifests, lock staleness."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from labkeeper import b2, pg_backup, postgres, restic

TRAILER = (b"COPY public.t (id) FROM stdin;\n1\n\\.\n\n\n--\n-- PostgreSQL database dump "
           b"complete\n--\n\n\\unrestrict AbCdEf123\n\n")


def _conn() -> postgres.Conn:
    return postgres.Conn(host="db.lan", port=5432, dbname="app", user="backup",
                         password=SecretStr("s3cret-pw"))


def _repo() -> restic.Repo:
    return restic.Repo(url="s3:https://s3.example/bucket/restic", password=SecretStr("pw-123"))


def test_plain_dump_with_its_trailer_is_complete():
    assert postgres.plain_dump_complete(TRAILER, len(TRAILER)) is None


def test_plain_dump_cut_before_the_trailer_is_incomplete():
    cut = TRAILER[:TRAILER.index(b"-- PostgreSQL")]
    assert "missing" in postgres.plain_dump_complete(cut, 1000)


def test_plain_dump_with_data_after_the_trailer_is_incomplete():
    assert "unexpected" in postgres.plain_dump_complete(TRAILER + b"INSERT 1;\n", 1000)


def test_empty_dump_is_incomplete():
    assert postgres.plain_dump_complete(b"", 0) == "the dump is empty"


def test_globals_dump_needs_the_cluster_trailer():
    tail = b"\\unrestrict X\n\n--\n-- PostgreSQL database cluster dump complete\n--\n\n"
    assert postgres.globals_dump_complete(tail, len(tail)) is None
    assert postgres.globals_dump_complete(TRAILER, len(TRAILER)) is not None


def test_pg_dump_argv_uses_the_exported_snapshot_and_never_the_password():
    argv = postgres.pg_dump_argv(_conn(), snapshot="00000003-000000BB-1")
    assert "--snapshot=00000003-000000BB-1" in argv and "-Fp" in argv
    assert "--no-password" in argv
    assert not any("s3cret-pw" in a for a in argv)


def test_pg_dump_argv_refuses_a_malformed_snapshot_id():
    with pytest.raises(ValueError):
        postgres.pg_dump_argv(_conn(), snapshot="x; DROP")


def test_custom_format_is_uncompressed_so_restic_can_deduplicate():
    argv = postgres.pg_dump_argv(_conn(), fmt="custom")
    assert "-Fc" in argv and argv[argv.index("-Z") + 1] == "0"


def test_globals_argv_without_role_passwords():
    argv = postgres.pg_dumpall_globals_argv(_conn(), role_passwords=False)
    assert "--globals-only" in argv and "--no-role-passwords" in argv
    assert argv[argv.index("-l") + 1] == "app"


def test_identifiers_and_literals_are_quoted():
    assert postgres.quote_ident('we"ird') == '"we""ird"'
    assert postgres.quote_literal("o'k") == "'o''k'"
    sql = postgres.row_counts_sql([("public", "Odd Name")])
    assert 'FROM "public"."Odd Name"' in sql and "'Odd Name'" in sql


def test_backup_argv_carries_host_tags_and_compression():
    argv = restic.backup_stdin_argv(_repo(), filename="appdb.sql", host="homelab",
                                    tags=[*pg_backup.series_tags("db1", "appdb"), "backup:x"])
    assert argv[argv.index("--host") + 1] == "homelab"
    tags = [argv[i + 1] for i, a in enumerate(argv) if a == "--tag"]
    assert tags == ["labkeeper", "db:db1/appdb", "kind:pg_dump", "backup:x"]
    assert argv[argv.index("--compression") + 1] == "auto"
    assert argv[argv.index("--stdin-filename") + 1] == "appdb.sql"


def test_tags_with_commas_are_refused():
    with pytest.raises(ValueError):
        restic.check_tag("a,b")


def test_forget_filters_one_series_and_groups_by_host_only():
    argv = restic.forget_policy_argv(_repo(), keep=("--keep-daily", "7"), host="homelab",
                                     tags=pg_backup.series_tags("db1", "appdb"), dry_run=True)
    assert argv[argv.index("--tag") + 1] == "labkeeper,db:db1/appdb,kind:pg_dump"
    assert argv[argv.index("--group-by") + 1] == "host"
    assert "--dry-run" in argv and "--prune" not in argv


def test_backup_ids_are_unique_per_attempt():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    a, b = pg_backup.new_backup_id(now), pg_backup.new_backup_id(now)
    assert a != b and a.startswith("20260102T030405Z-")


def test_summary_line_is_found_after_status_lines():
    out = ('{"message_type":"status","percent_done":0}\n'
           '{"message_type":"summary","data_added":10,"total_bytes_processed":6,'
           '"snapshot_id":"9b70e786"}\n')
    s = restic.parse_backup_summary(out)
    assert s.snapshot_id == "9b70e786" and s.total_bytes_processed == 6


def test_missing_summary_is_an_error():
    with pytest.raises(ValueError):
        restic.parse_backup_summary('{"message_type":"status"}\n')


def _lock(host: str, pid: int, age_s: float) -> restic.LockInfo:
    return restic.LockInfo(id="a" * 64, time=datetime.now(tz=UTC) - timedelta(seconds=age_s),
                           exclusive=True, hostname=host, pid=pid)


def test_lock_of_a_dead_process_on_this_host_is_stale():
    stale, why = restic.lock_is_stale(_lock("me", 42, 5), now=datetime.now(tz=UTC),
                                      this_host="me", stale_after=7200,
                                      pid_alive=lambda pid: False)
    assert stale and "42" in why


def test_recent_lock_of_another_host_is_live():
    stale, _ = restic.lock_is_stale(_lock("other", 42, 60), now=datetime.now(tz=UTC),
                                    this_host="me", stale_after=7200,
                                    pid_alive=lambda pid: False)
    assert not stale


def test_old_lock_of_another_host_is_stale():
    stale, why = restic.lock_is_stale(_lock("other", 42, 3 * 3600), now=datetime.now(tz=UTC),
                                      this_host="me", stale_after=7200,
                                      pid_alive=lambda pid: True)
    assert stale and "min old" in why


def _snap(short: str, tags: list[str]) -> restic.Snapshot:
    return restic.Snapshot(id=short * 8, short_id=short, time=datetime.now(tz=UTC), tags=tags)


def test_manifests_whose_dump_is_gone_are_orphans():
    snaps = [_snap("d1", ["kind:pg_dump", "backup:1"]),
             _snap("m1", ["kind:pg_manifest", "backup:1"]),
             _snap("m2", ["kind:pg_manifest", "backup:2"])]
    assert [s.short_id for s in pg_backup.orphan_manifests(snaps)] == ["m2"]


def test_manifest_round_trips_with_counts():
    facts = postgres.SnapshotFacts(snapshot_id="00000003-000000BB-1", server_version="15.18",
                                   database_size=123, tables=(("public", "users", 500),
                                                              ("public", "t", 0)))
    m = pg_backup.build_manifest(backup_id="b1", lab="lab", database="appdb", server="db1",
                                 dbname="appdb", facts=facts, dump_format="plain",
                                 compression="auto", pg_dump_version="15.18")
    back = pg_backup.parse_manifest(m.to_json().decode())
    assert back.table_count == 2 and back.total_rows == 500
    assert back.tables[0].name == "users" and back.pg_snapshot == "00000003-000000BB-1"


def test_monthly_cost_uses_the_price_per_terabyte():
    assert b2.monthly_cost(2 * 10**12, 6.0) == 12.0


def test_repository_prefix_of_an_s3_url():
    assert b2.repository_prefix("s3:https://s3.example.com/bucket/restic", "bucket") == "restic/"
    assert b2.repository_prefix("s3:http://127.0.0.1:9000/bucket", "bucket") == ""


def _summary(**kw) -> restic.BackupSummary:
    base = {"message_type": "summary", "snapshot_id": "9b70e786", "files_new": 1,
            "total_bytes_processed": 1000}
    return restic.BackupSummary.model_validate({**base, **kw})


def test_summary_of_one_file_with_every_byte_sent_proves_the_snapshot():
    assert restic.stdin_summary_problem(_summary(), 1000) is None
    again = _summary(files_new=0, files_changed=1)  # a later backup of the same series
    assert restic.stdin_summary_problem(again, 1000) is None


def test_summary_missing_bytes_does_not_prove_the_snapshot():
    problem = restic.stdin_summary_problem(_summary(total_bytes_processed=999), 1000)
    assert problem is not None and "999 bytes but 1000 were sent" in problem


def test_summary_without_exactly_one_file_or_snapshot_id_does_not_prove_it():
    assert "0 files" in restic.stdin_summary_problem(_summary(files_new=0), 1000)
    assert "2 files" in restic.stdin_summary_problem(_summary(files_unmodified=1), 1000)
    assert "snapshot id" in restic.stdin_summary_problem(_summary(snapshot_id=""), 1000)


def test_lock_failure_of_restic_0_14_is_recognised_as_a_lock_conflict():
    from labkeeper.errors import CommandError

    err = CommandError("restic failed", argv=("restic",), returncode=1, stderr_tail=(
        "unable to create lock in backend: repository is already locked exclusively by PID "
        "13533 on vm by root (UID 0, GID 0)"))
    refined = restic.classify_failure(err)
    assert refined.meaning == restic.LOCK_FAILED and refined.transient


def test_restic_backend_retry_line_becomes_a_short_log_note_and_other_lines_none():
    line = ("Load(<lock/3bd5d8a4f5>, 0, 0) returned error, retrying after 552.330144ms: "
            "<lock/3bd5d8a4f5> does not exist\n")
    assert restic.backend_retry(line) == (
        "restic is retrying Load(<lock/3bd5d8a4f5>, 0, 0) after 552.330144ms: "
        "<lock/3bd5d8a4f5> does not exist")
    assert restic.backend_retry("Save(<data/0a1b2c3d4e>) returned error, retrying after "
                                "1.2s: 503 Slow Down").startswith("restic is retrying Save(")
    assert restic.backend_retry("using parent snapshot 1a2b3c4d") is None
    assert restic.backend_retry("") is None
