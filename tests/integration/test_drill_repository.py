"""Repository DR drills: rotating `restic check --read-data-subset`, a random snapshot
restored byte for byte, and a pack corrupted in the bucket (our own, never the lab's)."""

from __future__ import annotations

import pytest

from labkeeper import drill, pg_backup, restic
from tests.integration.test_drill_support import (
    corrupt_largest_pack,
    drill_spec,
    load,
)

pytestmark = pytest.mark.integration


def _dump_snapshot(snaps):
    return next(s for s in snaps if "kind:pg_dump" in s.tags)


def test_repository_drill_rotates_the_read_subset_and_restores_a_snapshot_byte_for_byte(
        backed_up):
    e, _path, pw = backed_up
    inv = load(e.inventory("drill-db", pw, databases=[{"name": "appdb", "drill": drill_spec()}],
                           drills={"repository": {"read_data_period": 3}}, state="-rot"))
    repo = pg_backup.open_repo(inv, "lab-repo")
    first = drill.repository_drill(inv, "lab-repo", choose=_dump_snapshot)
    assert first.passed, first.summary()
    names = [c.name for c in first.checks]
    assert names[0] == "check 1/3"
    dump = _dump_snapshot(restic.snapshots(repo))
    file_check = next(c for c in first.checks if c.name.startswith("file "))
    assert file_check.name == f"file {dump.short_id}:/appdb.sql"
    assert "identical through restic restore --verify" in file_check.detail
    size = restic.ls(repo, dump.id)[-1].size
    assert f"dump {size} bytes sha256 " in file_check.detail
    second = drill.repository_drill(inv, "lab-repo", choose=lambda s: s[-1])
    assert second.passed and second.checks[0].name == "check 2/3"
    assert not list((inv.settings.state_dir / "drills" / "restore").iterdir())


def test_a_corrupted_pack_fails_the_repository_drill_and_the_database_drill(drill_env):
    e = drill_env
    _repo, pw = e.new_repo("drill-corrupt")
    inv = load(e.inventory("drill-corrupt", pw,
                           databases=[{"name": "appdb", "drill": drill_spec()}],
                           drills={"repository": {"read_data_period": 1}}))
    pg_backup.backup_database(inv, "appdb")
    corrupt_largest_pack(e, "drill-corrupt")

    repo_result = drill.repository_drill(inv, "lab-repo", choose=_dump_snapshot)
    assert not repo_result.passed
    failed = {c.name: c.detail for c in repo_result.failed_checks}
    assert "restic check found errors" in failed["check 1/1"]
    assert "restic dump" in repo_result.error  # the random restore hit the bad pack too
    # a failed check does not advance the rotation
    assert drill.read_subset_state(inv, "lab-repo") is None

    db_result = drill.database_drill(inv, "appdb")
    assert not db_result.passed
    assert "restic dump of" in db_result.error and "failed after" in db_result.error
