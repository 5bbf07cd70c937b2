"""A snapshot's full id from the file restic just added to its cache (restic 0.14 names
its snapshot by a short id): no `restic snapshots` run when the cache says it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from labkeeper import restic
from labkeeper.errors import LabkeeperError
from labkeeper.restic.commands import cached_snapshot_ids, canonical_summary
from labkeeper.restic.models import BackupSummary

A = "3f2a9c01" + "a" * 56
B = "3f2a9c01" + "b" * 56
C = "77aa00ff" + "c" * 56


def _repo(tmp_path: Path, cache: bool = True) -> restic.Repo:
    # a binary that cannot run: any restic start fails the test loudly
    return restic.Repo(url=str(tmp_path / "repo"), password=SecretStr("pw"),
                       cache_dir=str(tmp_path / "cache") if cache else None,
                       binary=str(tmp_path / "no-restic-here"))


def _cached(tmp_path: Path, *ids: str, repo_id: str = "r1") -> None:
    for i in ids:
        f = tmp_path / "cache" / repo_id / "snapshots" / i[:2] / i
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"encrypted")


def _summary(snapshot_id: str) -> BackupSummary:
    return BackupSummary.model_validate({"message_type": "summary", "snapshot_id": snapshot_id,
                                         "total_bytes_processed": 5, "files_new": 1})


def test_cached_snapshot_ids_are_the_full_ids_in_the_cache_and_nothing_else(tmp_path):
    _cached(tmp_path, A, C)
    _cached(tmp_path, B, repo_id="r2")
    (tmp_path / "cache" / "r1" / "snapshots" / "3f" / "not-an-id").write_text("x")
    (tmp_path / "cache" / "r1" / "index" / "3f").mkdir(parents=True)
    (tmp_path / "cache" / "r1" / "index" / "3f" / ("3f" + "d" * 62)).write_text("x")
    assert cached_snapshot_ids(_repo(tmp_path)) == {A, B, C}
    assert cached_snapshot_ids(_repo(tmp_path, cache=False)) == frozenset()


def test_short_id_is_completed_from_the_one_snapshot_restic_added_to_its_cache(tmp_path):
    repo = _repo(tmp_path)
    _cached(tmp_path, C)
    before = cached_snapshot_ids(repo)
    _cached(tmp_path, A)  # what the backup's restic wrote
    full = canonical_summary(repo, _summary(A[:8]), cached_before=before)
    assert full.snapshot_id == A


@pytest.mark.parametrize("case", ["two new under the prefix", "only an old one",
                                  "no record of before"])
def test_without_exactly_one_new_cached_snapshot_restic_is_asked(tmp_path, case):
    # the binary cannot run: asking restic fails, which proves it was asked
    repo = _repo(tmp_path)
    if case == "only an old one":
        _cached(tmp_path, A)
    before = cached_snapshot_ids(repo)
    if case == "two new under the prefix":
        _cached(tmp_path, A, B)
    elif case == "no record of before":
        _cached(tmp_path, A)
        before = None
    with pytest.raises(LabkeeperError):
        canonical_summary(repo, _summary(A[:8]), cached_before=before)


def test_a_full_id_is_kept_as_it_is(tmp_path):
    assert canonical_summary(_repo(tmp_path), _summary(A)).snapshot_id == A
