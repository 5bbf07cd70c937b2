"""restic 0.14 through 0.18 with real binaries: one canonical snapshot id, the same typed
failures, ``--retry-lock`` where restic has it, a cached version per binary, and a
backup written under one version drilled under the other."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from labkeeper import drill, pg_backup, restic
from labkeeper.errors import CommandError, ConfigError
from tests.fixtures.restic_keys import cheap_key
from tests.fixtures.restic_matrix import newer_restic
from tests.integration.test_drill_support import DrillEnv, drill_spec, load

pytestmark = pytest.mark.integration


def _repo(path: Path) -> restic.Repo:
    repo = restic.Repo(url=str(path), password=SecretStr("versions-test-pw"))
    restic.init(repo)
    cheap_key(repo)
    return repo


@pytest.fixture
def repo(tmp_path: Path, restic_bin: str) -> restic.Repo:
    return _repo(tmp_path / "repo")


@pytest.fixture
def locked(repo: restic.Repo):
    """``repo`` with a live ``restic backup --stdin`` holding its (shared) lock."""
    pending = restic.PendingBackup(repo, filename="held.bin", host="h", tags=["held"])
    pending.prime(b"x")
    assert pending.wait_reading(60), "restic did not take its lock"
    yield repo, pending
    pending.abort()


@pytest.mark.restic_matrix
def test_backup_summaries_name_the_full_snapshot_id_on_every_restic_version(repo):
    summary = restic.backup_bytes(repo, b"hello\n", filename="m.json", host="h",
                                  tags=["labkeeper"])
    (snap,) = restic.find_snapshots(repo, tags=["labkeeper"])
    assert restic.is_full_id(summary.snapshot_id)
    assert summary.snapshot_id == snap.id
    # restic 0.17+ also says how much it really stored (after compression)
    assert (summary.data_added_packed is not None) == restic.repo_version(repo).exit_codes


@pytest.mark.restic_matrix
def test_missing_repository_and_wrong_password_fail_with_the_same_typed_meaning(tmp_path,
                                                                                repo):
    missing = restic.Repo(url=str(tmp_path / "nowhere"), password=SecretStr("x"))
    with pytest.raises(CommandError) as no_repo:
        restic.snapshots(missing, timeout=60)
    wrong = restic.Repo(url=repo.url, password=SecretStr("not-the-password"))
    with pytest.raises(CommandError) as bad_pw:
        restic.snapshots(wrong, timeout=60)
    new = restic.repo_version(repo).exit_codes
    assert (no_repo.value.returncode, bad_pw.value.returncode) == ((10, 12) if new else (1, 1))
    assert no_repo.value.meaning == "repository does not exist"
    assert bad_pw.value.meaning == "wrong password"
    assert not no_repo.value.transient and not bad_pw.value.transient
    # restic 0.17+'s JSON exit_error line is read, not shown raw
    assert '"message_type"' not in str(no_repo.value)
    assert "wrong password or no key found" in str(bad_pw.value)


@pytest.mark.restic_matrix
def test_a_held_lock_fails_an_exclusive_command_as_a_transient_lock_failure(locked):
    repo, _pending = locked
    with pytest.raises(CommandError) as err:
        restic.run_restic(repo, restic.prune_argv(repo), timeout=120)
    assert err.value.meaning == restic.LOCK_FAILED and err.value.transient
    assert err.value.returncode == (11 if restic.repo_version(repo).exit_codes else 1)


@pytest.mark.restic_matrix
def test_prune_waits_out_a_lock_released_in_time_when_restic_has_retry_lock(locked):
    repo, pending = locked
    if not restic.repo_version(repo).retry_lock:
        with pytest.raises(CommandError) as err:  # 0.14: no --retry-lock, fails at once
            restic.prune(repo, timeout=120)
        assert err.value.meaning == restic.LOCK_FAILED and err.value.transient
        return
    waiting = threading.Event()
    outcome: list[object] = []

    def said(line: str) -> None:
        if "already locked, waiting" in line:
            waiting.set()

    def run_prune() -> None:
        try:
            outcome.append(restic.prune(repo, timeout=120, on_line=said))
        except CommandError as exc:
            outcome.append(exc)

    pruner = threading.Thread(target=run_prune, daemon=True)
    pruner.start()
    assert waiting.wait(60), "prune did not wait for the lock"
    pending.finish(b"x", timeout=60)  # the lock goes; prune takes it and runs
    pruner.join(120)
    assert outcome and isinstance(outcome[0], str), outcome


@pytest.mark.restic_matrix
def test_forget_policy_keeps_and_removes_the_same_snapshots_on_every_restic_version(repo):
    for day in (1, 2, 3):
        argv = (*restic.backup_stdin_argv(repo, filename="s.sql", host="h",
                                          tags=["labkeeper", "db:x/s"]),
                "--time", f"2026-01-0{day} 02:00:00")
        restic.run_restic(repo, argv, timeout=120, input=f"day {day}\n".encode())
    snaps = restic.find_snapshots(repo, tags=["labkeeper", "db:x/s"])
    (group,) = restic.forget_policy(repo, keep=["--keep-last", "1"], host="h",
                                    tags=["labkeeper", "db:x/s"])
    assert [s.id for s in group.keep or []] == [snaps[-1].id]
    assert sorted(s.id for s in group.remove or []) == sorted(s.id for s in snaps[:2])
    assert [s.id for s in restic.find_snapshots(repo, tags=["labkeeper"])] == [snaps[-1].id]


def _fake_restic(path: Path, version: str, counter: Path) -> None:
    path.write_text(f"#!/bin/sh\necho run >> {counter}\n"
                    f"echo 'restic {version} compiled with go1.24.4 on linux/amd64'\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_version_is_read_once_per_binary_and_again_when_the_binary_changes(tmp_path):
    binary, counter = tmp_path / "restic", tmp_path / "runs"
    _fake_restic(binary, "0.17.3", counter)
    assert restic.version_info(str(binary)) == restic.ResticVersion(0, 17, 3)
    assert str(restic.version_info(str(binary))) == "0.17.3"
    assert counter.read_text().count("run") == 1
    replacement = tmp_path / "restic.new"
    _fake_restic(replacement, "0.18.1", counter)
    replacement.replace(binary)  # an upgrade: a new file at the same path
    assert restic.version_info(str(binary)) == restic.ResticVersion(0, 18, 1)
    assert counter.read_text().count("run") == 2


def test_a_missing_restic_binary_is_a_config_error_naming_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="LABKEEPER_RESTIC"):
        restic.version_info(str(tmp_path / "no-restic"))


def test_labkeeper_restic_chooses_the_binary_of_every_restic_command(tmp_path, monkeypatch):
    monkeypatch.setenv(restic.BINARY_ENV, "/opt/restic-x/restic")
    repo = restic.Repo(url=str(tmp_path), password=SecretStr("x"))
    assert restic.snapshots_argv(repo)[0] == "/opt/restic-x/restic"
    assert restic.version_argv()[0] == "/opt/restic-x/restic"
    pinned = restic.Repo(url=str(tmp_path), password=SecretStr("x"), binary="/usr/bin/restic")
    assert restic.prune_argv(pinned)[0] == "/usr/bin/restic"


# -- a backup under one restic, drilled under the other ----------------------------------

def _versions() -> tuple[str, str]:
    old, new = restic.default_binary(), newer_restic()
    try:
        if restic.version_info(old) == restic.version_info(new):
            pytest.fail(f"{old} and {new} are the same restic version: the cross-version "
                        "test needs two (unset LABKEEPER_RESTIC or set LABKEEPER_RESTIC_NEW)")
    except ConfigError as exc:
        pytest.fail(f"restic matrix: {exc}; install with `make apt-deps`")
    return old, new


@pytest.mark.parametrize("direction", ["older-writes-newer-drills", "newer-writes-older-drills"])
def test_backup_written_by_one_restic_version_is_read_and_verified_by_a_drill_under_the_other(
        drill_env: DrillEnv, monkeypatch, direction):
    old, new = _versions()
    writer, reader = (old, new) if direction.startswith("older") else (new, old)
    bucket = f"xver-{direction[:5]}"
    _unused, pw = drill_env.new_repo(bucket)
    path = drill_env.inventory(bucket, pw, databases=[{"name": "appdb", "drill": drill_spec()}],
                               drills={"repository": {"enabled": False}})
    inv = load(path)
    monkeypatch.setenv(restic.BINARY_ENV, writer)
    pg_backup.backup_globals(inv, pg_backup.server_label(inv, inv.database("appdb")),
                             ["appdb"])
    made = pg_backup.backup_database(inv, "appdb")
    assert restic.is_full_id(made.snapshot_id) and restic.is_full_id(made.manifest_snapshot_id)

    monkeypatch.setenv(restic.BINARY_ENV, reader)
    repo = pg_backup.open_repo(inv, inv.repository_for(inv.database("appdb")).name)
    stored = pg_backup.find_latest_backup(repo, lab="local-lab", server="127.0.0.1",
                                          name="appdb")
    assert stored is not None and stored.dump.id == made.snapshot_id
    manifest = pg_backup.read_manifest(repo, stored)
    assert manifest.dump is not None and manifest.dump.snapshot_id == stored.dump.id
    result = drill.database_drill(inv, "appdb")
    assert result.passed, result.summary()
    checks = {c.name: c for c in result.checks}
    assert checks["manifest names dump"].ok and checks["dump size"].ok
    assert checks["table public.users"].detail == "500 rows"


# -- doctor ------------------------------------------------------------------------------

@pytest.mark.restic_matrix
def test_doctor_reports_the_restic_version_here_and_on_every_path_backup_host(lab, restic_bin):
    from labkeeper import doctor
    from labkeeper.inventory import load_inventory

    inv = load_inventory(lab.inventory_path)
    hosts = sorted({pb.host for pb in inv.path_backups})
    specs = [s for s in doctor.plan_checks(inv) if s.check == "restic"]
    assert hosts and [s.target for s in specs] == ["local", *hosts]
    local, *remote = [doctor.run_check(inv, s) for s in specs]
    assert local.status == "ok"
    assert local.detail.startswith(f"restic {restic.version_info(restic_bin)} at ")
    for row in remote:
        assert row.status == "ok" and row.detail.startswith("restic 0."), row


def test_doctor_names_what_to_install_when_a_path_backup_host_has_no_restic(lab):
    from labkeeper import doctor, path_backup
    from labkeeper.inventory import load_inventory

    inv = load_inventory(lab.inventory_path)
    pbs = [pb.model_copy(update={"restic_binary": "/nonexistent/restic"})
           for pb in inv.path_backups]
    inv = inv.model_copy(update={"path_backups": pbs})
    with pytest.raises(path_backup.ResticMissing, match="apt-get install restic"):
        doctor.run_check(inv, doctor.CheckSpec("restic", pbs[0].host))


def test_settings_restic_binary_is_the_restic_of_every_repository_command_and_of_doctor(lab):
    from labkeeper import doctor
    from labkeeper.inventory import load_inventory

    inv = load_inventory(lab.inventory_path)
    new = newer_restic()
    inv = inv.model_copy(update={"settings": inv.settings.model_copy(
        update={"restic_binary": new})})
    repo = doctor.repo_for(inv, inv.repositories[0].name)
    assert restic.snapshots_argv(repo)[0] == new
    assert restic.repo_version(repo) == restic.version_info(new)
    assert restic.repo_config(repo).version == 2  # the lab's repository, opened by that restic
    row = doctor.check_restic(inv, doctor.LOCAL)
    assert row.status == "ok" and row.detail.startswith(
        f"restic {restic.version_info(new)} at {new} ")
