"""The dead-man's check (flows/deadman.py) against a real restic repository and a local
HTTP receiver for the notifications: late series are told once, fresh ones not at all."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from flows.deadman import BackupsLate, backup_watch_flow
from labkeeper import restic
from labkeeper.locallab.lab import write_secret
from tests.fixtures.restic_keys import cheap_key

LAB = "watch"
HOST = "127.0.0.1"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[restic.Repo, Path, Path]:
    d = tmp_path_factory.mktemp("watch-repo")
    secret = write_secret(d / "restic-password", "watch-repo-password-1")
    r = restic.Repo(url=str(d / "repo"), password=SecretStr("watch-repo-password-1"),
                    cache_dir=str(d / "cache"))
    restic.init(r)
    cheap_key(r)
    return r, d / "repo", secret


def _backup(repo: restic.Repo, db: str, when: datetime) -> None:
    """A dump of the database's series and its manifest as pg_backup tags them, taken at
    ``when`` (a dump counts only with its manifest)."""
    bid = f"{db}-{when:%Y%m%d%H%M%S}"
    for kind, name in (("pg_dump", f"{db}.sql"), ("pg_manifest", f"{db}.manifest.json")):
        argv = restic.backup_stdin_argv(repo, filename=name, host=LAB, tags=[
            "labkeeper", f"db:{HOST}/{db}", f"kind:{kind}", f"backup:{bid}"])
        restic.run_restic(repo, (*argv, "--time", when.strftime("%Y-%m-%d %H:%M:%S")),
                          timeout=60, input=f"-- {kind} of {db}\n".encode())


def _inventory(tmp: Path, repo_dir: Path, secret: Path, dbs: list[str], apprise: str) -> Path:
    apprise_file = write_secret(tmp / "apprise-url", apprise)
    check = write_secret(tmp / "hc-check", "watch-check")
    base = apprise.replace("json://", "http://").rsplit("/", 1)[0]
    databases = "\n".join(
        f"  - {{name: {db}, host: {HOST}, user: u, drill: {{enabled: false, rpo_hours: 26}}}}"
        for db in dbs)
    path = tmp / "lab.yaml"
    path.write_text(f"""
version: 1
lab: {{name: {LAB}}}
settings: {{state_dir: {tmp / "state"}}}
repositories:
  - {{name: local, url: {repo_dir}, password: "file:{secret}"}}
databases:
{databases}
notifications:
  apprise: ["file:{apprise_file}"]
  on: [failure, missing_backup]
  healthchecks: {{base_url: "{base}/ping", pings: {{missing_backup: "file:{check}"}}}}
""")
    return path


def _messages(receiver) -> list[dict]:
    return [json.loads(r.body) for r in receiver.requests if r.path == "/hook"]


def _pings(receiver) -> list[str]:
    return [r.path for r in receiver.requests if r.path.startswith("/ping/")]


def test_stale_database_backup_is_notified_once_naming_it_and_the_run_fails(
        prefect_harness, repo, receiver, tmp_path: Path):
    r, repo_dir, secret = repo
    now = datetime.now()
    _backup(r, "stale_db", now - timedelta(hours=50))
    _backup(r, "fresh_db", now - timedelta(hours=1))
    lab = _inventory(tmp_path, repo_dir, secret, ["stale_db", "fresh_db"],
                     f"json://{HOST}:{receiver.port}/hook")

    state = backup_watch_flow(lab=str(lab), return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), BackupsLate)
    msgs = _messages(receiver)
    assert len(msgs) == 1, msgs  # one per late series; the failure hook adds nothing
    assert "stale_db" in msgs[0]["title"] and "late" in msgs[0]["title"]
    assert "fresh_db" not in msgs[0]["title"] + msgs[0]["message"]
    # how late: 50 h old against an RPO of 26 h is 24 h past the objective
    assert "past its objective (RPO 26.0 h)" in msgs[0]["message"]
    assert "24.0 h past its objective" in msgs[0]["message"]
    assert _pings(receiver) == ["/ping/watch-check/start", "/ping/watch-check/fail"]
    log = json.loads((tmp_path / "state" / "backup-watch.json").read_text())
    assert set(log["alerts"]) == {"database:stale_db"}

    again = backup_watch_flow(lab=str(lab), return_state=True)
    assert again.is_failed()
    assert len(_messages(receiver)) == 1  # same late series: no second message

    _backup(r, "stale_db", datetime.now())
    fixed = backup_watch_flow(lab=str(lab), return_state=True)
    assert fixed.is_completed(), fixed.message
    msgs = _messages(receiver)
    assert len(msgs) == 2
    assert "stale_db" in msgs[1]["title"] and "within its objective again" in msgs[1]["title"]
    assert json.loads((tmp_path / "state" / "backup-watch.json").read_text())["alerts"] == {}


def test_all_fresh_backups_send_no_notification_and_the_run_completes(
        prefect_harness, repo, receiver, tmp_path: Path):
    r, repo_dir, secret = repo
    _backup(r, "always_fresh", datetime.now() - timedelta(hours=2))
    lab = _inventory(tmp_path, repo_dir, secret, ["always_fresh"],
                     f"json://{HOST}:{receiver.port}/hook")
    state = backup_watch_flow(lab=str(lab), return_state=True)
    assert state.is_completed(), state.message
    rows = state.result()
    assert [(row["target"], row["state"]) for row in rows] == [("always_fresh", "ok")]
    assert _messages(receiver) == []
    assert _pings(receiver) == ["/ping/watch-check/start", "/ping/watch-check"]


def test_a_database_never_backed_up_is_reported_missing(
        prefect_harness, repo, receiver, tmp_path: Path):
    _r, repo_dir, secret = repo
    lab = _inventory(tmp_path, repo_dir, secret, ["never_backed_up"],
                     f"json://{HOST}:{receiver.port}/hook")
    state = backup_watch_flow(lab=str(lab), return_state=True)
    assert state.is_failed()
    (msg,) = _messages(receiver)
    assert "never_backed_up" in msg["title"] and "missing" in msg["title"]
    assert "no backup found" in msg["message"]


def test_an_unreadable_repository_is_one_message_not_a_missing_backup_per_database(
        prefect_harness, repo, receiver, tmp_path: Path):
    _r, _repo_dir, secret = repo
    lab = _inventory(tmp_path, tmp_path / "no-such-repo", secret, ["a_db", "b_db"],
                     f"json://{HOST}:{receiver.port}/hook")
    state = backup_watch_flow(lab=str(lab), return_state=True)
    assert state.is_failed()
    (msg,) = _messages(receiver)
    assert "cannot check backups: repository local not readable" in msg["title"]
    assert "missing" not in msg["title"]
