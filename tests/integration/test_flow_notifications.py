"""Each event of issue 10's notification list reaches a real local HTTP receiver from the
flow that raises it: a drill failure and an update rolled back. (A failed run: see
test_doctor_flow's hook tests; a missing backup: test_backup_watch.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from flows.dr_drill import dr_drill_flow
from flows.update import update_app_flow
from labkeeper import restic
from labkeeper.locallab.lab import write_secret
from tests.fixtures.restic_keys import cheap_key
from tests.integration.test_update_flow import UpdLab, upd  # noqa: F401 - upd is a fixture

pytestmark = pytest.mark.integration


def _notifications(receiver, on: list[str], tmp: Path) -> dict:
    url = write_secret(tmp / "apprise-url", f"json://127.0.0.1:{receiver.port}/hook")
    return {"apprise": [f"file:{url}"], "on": on}


def _messages(receiver) -> list[dict]:
    return [json.loads(r.body) for r in receiver.requests if r.path == "/hook"]


def test_a_failed_drill_is_notified_once_naming_the_target(prefect_harness, receiver,
                                                      tmp_path: Path):
    secret = write_secret(tmp_path / "restic-pw", "drill-notify-repo-pw")
    repo = restic.Repo(url=str(tmp_path / "repo"), password=SecretStr("drill-notify-repo-pw"))
    restic.init(repo)  # an empty repository: there is no backup to restore
    cheap_key(repo)
    inv = {"version": 1, "lab": {"name": "notify"},
           "settings": {"state_dir": str(tmp_path / "state")},
           "repositories": [{"name": "r", "url": str(tmp_path / "repo"),
                             "password": f"file:{secret}"}],
           "databases": [{"name": "appdb", "host": "127.0.0.1",
                          "drill": {"enabled": True, "rpo_hours": 26}}],
           "drills": {"repository": {"enabled": False}},
           # "failure" too: the drill message is the only one (not also "run failed")
           "notifications": _notifications(receiver, ["drill", "failure"], tmp_path)}
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(inv))
    state = dr_drill_flow(target="all", lab=str(path), return_state=True)
    assert state.is_failed()
    (msg,) = _messages(receiver)
    assert "DR drill" in msg["title"] and "failed" in msg["title"]
    assert "appdb" in msg["message"]


def test_a_rolled_back_update_is_notified_once_naming_the_app_and_recorded_as_a_metric(
        upd: UpdLab, prefect_harness, receiver, tmp_path: Path):  # noqa: F811
    web = upd.guest("web", 320)
    path = upd.write([upd.app(web, [web.set_command("2.0-broken", health="fail")])])
    inv = yaml.safe_load(path.read_text())
    # "failure" too: the rollback message is the only one (not also "run failed")
    inv["notifications"] = _notifications(receiver, ["rollback", "failure"], tmp_path)
    textfile = tmp_path / "metrics" / "labkeeper.prom"
    inv["settings"]["metrics"] = {"textfile": str(textfile)}
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    state = update_app_flow(apps=["web"], lab=str(path), return_state=True)
    assert state.name == "RolledBack", state.message
    (msg,) = _messages(receiver)
    assert msg["title"] == "labkeeper: web update rolled back"
    assert "2.0-broken" in msg["message"]  # what was attempted
    # the update outcome in the textfile-collector file (issue 10, item 6)
    from prometheus_client.parser import text_string_to_metric_families

    fams = {f.name: f for f in text_string_to_metric_families(textfile.read_text())}
    assert [(s.labels["app"], s.value) for s in fams["labkeeper_update_rolled_back"].samples] \
        == [("web", 1.0)]
    assert [s.value for s in fams["labkeeper_update_success"].samples] == [0.0]
