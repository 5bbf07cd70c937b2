"""Globals stored only when they changed: the pure decisions (labkeeper/pg_globals.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from labkeeper import pg_globals

NOW = datetime(2026, 12, 5, 3, 0, tzinfo=UTC)
DUMP = ("--\n-- PostgreSQL database cluster dump\n--\n\\restrict abc123\n"
        "CREATE ROLE app;\n\\unrestrict abc123\n--\n-- PostgreSQL database cluster dump "
        "complete\n--\n")


def _record(**kw):
    return {"sha256": pg_globals.normalised_hash(DUMP), "snapshot_id": "a" * 64,
            "repository": "r", "repo_url": "s3:x/y", "role_passwords": False,
            "stored_at": (NOW - timedelta(days=1)).isoformat(), **kw}


def _reusable(record, dump=DUMP, **kw):
    args = {"sha256": pg_globals.normalised_hash(dump), "repository": "r",
            "repo_url": "s3:x/y", "role_passwords": False, "now": NOW, **kw}
    return pg_globals.reusable(record, **args)


def test_hash_ignores_the_random_restrict_key_of_each_dump():
    other = DUMP.replace("abc123", "zz9")
    assert pg_globals.normalised_hash(other) == pg_globals.normalised_hash(DUMP)
    assert pg_globals.normalised_hash(DUMP.replace("app", "app2")) != \
        pg_globals.normalised_hash(DUMP)


def test_unchanged_globals_in_the_same_repository_reuse_the_recorded_snapshot():
    assert _reusable(_record()) == "a" * 64


def test_changed_moved_old_or_other_password_mode_globals_are_stored_again():
    assert _reusable(_record(), DUMP.replace("app", "app2")) is None
    assert _reusable(_record(repository="other")) is None
    assert _reusable(_record(repo_url="s3:x/z")) is None
    assert _reusable(_record(role_passwords=True)) is None
    assert _reusable(_record(stored_at=(NOW - timedelta(days=8)).isoformat())) is None
    assert _reusable(_record(stored_at=(NOW + timedelta(days=1)).isoformat())) is None
    assert _reusable(None) is None and _reusable(_record(snapshot_id="")) is None
