"""The dump's restic started ahead of its backup (labkeeper.pg_backup.ahead) against the
real local lab: real restic (both versions), PostgreSQL and moto's S3 server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from labkeeper import pg_backup, restic
from labkeeper.inventory import Inventory, load_inventory
from tests.fixtures.restic_keys import cheap_key, repo_bucket
from tests.fixtures.waiting import wait_until

DB = "photos"


@pytest.fixture(scope="module")
def own_repo(lab, tmp_path_factory) -> str:
    """A repository of this module's own: no lock another module's test left in the
    lab's repository can meet these tests (they leave none themselves)."""
    data = yaml.safe_load(lab.inventory_path.read_text())
    url = data["repositories"][0]["url"]
    url = f"{url.rsplit('/', 1)[0]}/ahead-{tmp_path_factory.mktemp('ahead').name}"
    data["repositories"][0]["url"] = url
    path = tmp_path_factory.mktemp("ahead-init") / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    own = pg_backup.open_repo(load_inventory(path), "lab-repo")
    restic.init(own)
    cheap_key(own)
    return url


def _wrapped(lab, own_repo: str, tmp_path: Path) -> tuple[Path, Inventory]:
    """An inventory backing up into ``own_repo``, whose restic notes each command line
    it is started with."""
    calls = tmp_path / "restic-calls"
    wrapper = tmp_path / "restic"
    real = shutil.which(restic.default_binary())
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    data = yaml.safe_load(lab.inventory_path.read_text())
    repo = data["repositories"][0]
    repo["url"] = own_repo
    repo.pop("cache_dir", None)
    data.setdefault("settings", {}).update(state_dir=str(tmp_path / "state"),
                                           cache_dir=str(tmp_path / "cache"),
                                           restic_binary=str(wrapper))
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return calls, load_inventory(path)


def _lock_objects(repo: restic.Repo) -> list[str]:
    """The repository's lock files, straight from the bucket (no restic start)."""
    s3, bucket, prefix = repo_bucket(repo)
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/locks/")
    return [o["Key"] for o in listed.get("Contents", [])]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.restic_matrix
def test_a_backup_takes_over_the_restic_started_ahead_and_stores_that_backup(
        lab, own_repo, tmp_path):
    calls, inv = _wrapped(lab, own_repo, tmp_path)
    with pg_backup.started_ahead(inv, [DB]) as out:
        [one] = out
        before = wait_until(lambda: _lines(calls), timeout=60, what="the restic started ahead")
        result = pg_backup.backup_database(inv, DB)
    during = _lines(calls)[len(before):]
    assert len(before) == 1 and f"backup:{one.backup_id}" in before[0].split()
    assert "--stdin-filename photos.sql" in before[0]
    # the backup started only the manifest's restic: the dump's was the one started ahead
    assert len(during) == 1 and "--stdin-filename photos.manifest.json" in during[0], during
    assert not one.early.waiting
    assert result.backup_id == one.backup_id
    repo = pg_backup.open_repo(inv, "lab-repo")
    stored = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1", name=DB)
    assert stored is not None and stored.backup_id == one.backup_id
    assert stored.dump.id == result.snapshot_id and restic.is_full_id(result.snapshot_id)
    manifest = pg_backup.read_manifest(repo, stored)
    assert manifest.dump is not None and manifest.dump.snapshot_id == stored.dump.id
    assert manifest.dump.bytes == result.bytes_dumped > 0 and manifest.total_rows > 0


@pytest.mark.restic_matrix
def test_a_restic_started_ahead_that_no_backup_takes_stores_nothing_and_leaves_no_lock(
        lab, own_repo, tmp_path):
    _calls, inv = _wrapped(lab, own_repo, tmp_path)
    repo = pg_backup.open_repo(inv, "lab-repo")
    with pg_backup.started_ahead(inv, [DB]) as out:
        [one] = out
        # Stopped the moment its lock appears: restic 0.14 is then still checking the
        # other locks and exits without removing its own (the stop removes it).
        wait_until(lambda: _lock_objects(repo), timeout=60, what="its lock", every=0.005)
    assert not one.early.waiting
    assert restic.list_locks(repo) == [] and _lock_objects(repo) == []
    assert restic.find_snapshots(repo, tags=[pg_backup.backup_tag(one.backup_id)]) == []


def test_a_backup_asked_for_another_backup_id_stops_the_restic_started_ahead(
        lab, own_repo, tmp_path):
    calls, inv = _wrapped(lab, own_repo, tmp_path)
    repo = pg_backup.open_repo(inv, "lab-repo")
    with pg_backup.started_ahead(inv, [DB]) as out:
        [one] = out
        wait_until(lambda: _lines(calls), timeout=60, what="the restic started ahead")
        result = pg_backup.backup_database(inv, DB, backup_id="20260101T020000Z-0a0b0c")
        assert not one.early.waiting  # stopped at once, before the backup ran
    assert result.backup_id == "20260101T020000Z-0a0b0c"
    assert restic.find_snapshots(repo, tags=[pg_backup.backup_tag(one.backup_id)]) == []
    assert len(restic.find_snapshots(repo, tags=[pg_backup.backup_tag(result.backup_id)])) == 2
