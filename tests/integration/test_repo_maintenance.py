"""Repository maintenance against a real restic repository on moto's S3 server."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import yaml
from prefect.logging import disable_run_logger

from flows.repo_maintenance import repo_maintenance_flow
from labkeeper import pg_backup, restic
from labkeeper.inventory import load_inventory
from tasks import repo_maintenance as mt
from tests.fixtures.restic_keys import cheap_key


def _add(repo: restic.Repo, name: str, day: int, kind: str, *, hour: int = 2,
         at: str | None = None) -> str:
    bid = f"202601{day:02d}T{hour:02d}0000Z-{name[:3]}{day:03d}"
    for k, fname in (("pg_dump", f"{name}.sql"), ("pg_manifest", f"{name}.manifest.json")):
        if kind == "dump-only" and k == "pg_manifest":
            continue
        argv = (*restic.backup_stdin_argv(
            repo, filename=fname, host="local-lab",
            tags=[*pg_backup.series_tags("127.0.0.1", name, k), pg_backup.backup_tag(bid)]),
            "--time", at or f"2026-01-{day:02d} {hour:02d}:00:00")
        restic.run_restic(repo, argv, timeout=120, input=f"{name} {day} {k}\n".encode())
    return bid


def _maint_lab(lab, tmp_path, retention: dict) -> Path:
    """The lab inventory with a fresh repository ``maint`` (``retention``) for every
    database."""
    inv = yaml.safe_load(lab.inventory_path.read_text())
    base = inv["repositories"][0]
    inv["repositories"].append({**base, "name": "maint",
                                "url": base["url"].rsplit("/", 1)[0] + "/" + tmp_path.name,
                                "retention": retention,
                                "cache_dir": str(tmp_path / "cache")})
    for d in inv["databases"]:
        d["repository"] = "maint"
        d["globals"] = False
    inv["settings"]["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    return path


def test_a_dump_without_its_manifest_is_forgotten_before_retention_never_kept_instead(
        lab, tmp_path):
    path = _maint_lab(lab, tmp_path, {"keep_daily": 2})
    inv = load_inventory(path)
    repo = pg_backup.open_repo(inv, "maint")
    restic.init(repo)
    cheap_key(repo)
    for day in (1, 2, 3):
        _add(repo, "appdb", day, "pair")
    # a failed attempt later on day 3 left its dump (the worker died before the manifest):
    # the newest of that day, it would be kept by keep-daily instead of day 3's backup
    _add(repo, "appdb", 3, "dump-only", hour=5)
    # a dump without a manifest from minutes ago may be a backup still in flight
    _add(repo, "photos", 1, "pair")
    _add(repo, "photos", 2, "pair")
    young = _add(repo, "photos", 9, "dump-only",
                 at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"))
    with disable_run_logger():
        rows = mt.forget.fn(inv, "maint")
    left = restic.find_snapshots(repo)
    appdb = [s for s in left if "db:127.0.0.1/appdb" in s.tags]
    assert sorted((s.time.day, s.time.hour, pg_backup.backup_id_of(s) is not None)
                  for s in appdb if "kind:pg_dump" in s.tags) == [(2, 2, True), (3, 2, True)]
    assert sorted(s.time.day for s in appdb if "kind:pg_manifest" in s.tags) == [2, 3]
    removed = [r for r in rows if r["action"] == "removed (no manifest)"]
    assert [r["series"] for r in removed] == ["db:127.0.0.1/appdb"]
    # rows name snapshots by their full id (restic 0.18 prints no 8-digit ids everywhere)
    ids = {s.id for s in restic.find_snapshots(repo)} | {r["id"] for r in rows
                                                         if r["action"] != "keep"}
    assert all(len(r["id"]) == 64 and r["id"] in ids for r in rows)
    # photos: retention waits (nothing of that series removed), the young dump stays
    photos = [s for s in left if "db:127.0.0.1/photos" in s.tags]
    assert len(photos) == 5 and not [r for r in rows if "photos" in r["series"]]
    assert [pg_backup.backup_id_of(s) for s in photos if s.time.day != 1 and s.time.day != 2
            ] == [young]


def test_forget_keeps_each_database_series_by_retention_and_dry_run_changes_nothing(
        lab, prefect_harness, tmp_path):
    inv = yaml.safe_load(lab.inventory_path.read_text())
    base = inv["repositories"][0]
    inv["repositories"].append({**base, "name": "maint",
                                "url": base["url"].rsplit("/", 1)[0] + "/maint",
                                "retention": {"keep_last": 2},
                                "check": {"read_data_subset": "50%"},
                                "cache_dir": str(tmp_path / "cache")})
    for d in inv["databases"]:
        d["repository"] = "maint"
        d["globals"] = False
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    repo = pg_backup.open_repo(load_inventory(path), "maint")
    restic.init(repo)
    cheap_key(repo)
    for day in (1, 2, 3, 4):
        _add(repo, "appdb", day, "pair")
    _add(repo, "photos", 1, "pair")
    before = {s.id for s in restic.find_snapshots(repo)}
    assert len(before) == 10

    dry = repo_maintenance_flow(lab=str(path), repository="maint", dry_run=True,
                                return_state=True)
    assert dry.is_completed(), dry.message
    rows = dry.result()["maint"]["forget"]
    appdb = [r for r in rows if r["series"] == "db:127.0.0.1/appdb"]
    assert sorted(r["action"] for r in appdb) == ["keep", "keep", "would remove",
                                                  "would remove"]
    assert [r for r in rows if r["series"] == "manifests"] and all(
        r["action"] == "would remove" for r in rows if r["series"] == "manifests")
    assert {s.id for s in restic.find_snapshots(repo)} == before

    state = repo_maintenance_flow(lab=str(path), repository="maint", return_state=True)
    assert state.is_completed(), state.message
    report = state.result()["maint"]
    left = restic.find_snapshots(repo)
    dumps = [s for s in left if "kind:pg_dump" in s.tags and "db:127.0.0.1/appdb" in s.tags]
    assert sorted(s.time.day for s in dumps) == [3, 4]
    manifests = [s for s in left if "kind:pg_manifest" in s.tags
                 and "db:127.0.0.1/appdb" in s.tags]
    assert sorted(s.time.day for s in manifests) == [3, 4]
    assert len([s for s in left if "db:127.0.0.1/photos" in s.tags]) == 2  # its own series
    assert "no errors were found" in report["check"]
    usage = report["usage"]
    assert usage["prefix"] == "maint/" and usage["objects"] > 0 and usage["bytes"] > 0
    assert usage["versioning"] == "Off" and usage["object lock"] == "Off"
    assert (tmp_path / "cache").is_dir() and any((tmp_path / "cache").iterdir())
