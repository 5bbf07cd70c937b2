"""Notifications (Apprise) and healthchecks pings reach a real local HTTP receiver."""

from __future__ import annotations

import json

import pytest

from labkeeper import notify
from labkeeper.inventory import parse_inventory
from labkeeper.secrets import register


def _inv(receiver, on="[failure, rollback]"):
    text = f"""
version: 1
lab: {{name: t}}
notifications:
  apprise: [env:LK_TEST_APPRISE]
  on: {on}
  healthchecks:
    base_url: {receiver.url}/ping
    pings: {{pg_backup: env:LK_TEST_HC}}
"""
    return parse_inventory(text, "t.yaml")


@pytest.fixture
def env(monkeypatch, receiver):
    monkeypatch.setenv("LK_TEST_APPRISE", f"json://127.0.0.1:{receiver.port}/hook")
    monkeypatch.setenv("LK_TEST_HC", "5f1e-check-uuid-77")


def test_failure_notification_is_delivered_as_json(receiver, env):
    out = notify.notify(_inv(receiver), "failure", "backup failed", "appdb: pg_dump exit 1")
    assert [d.ok for d in out] == [True]
    body = json.loads(receiver.requests[0].body)
    assert body["title"] == "backup failed" and "pg_dump exit 1" in body["message"]


def test_events_not_subscribed_send_nothing(receiver, env):
    assert notify.notify(_inv(receiver), "success", "t", "b") == []
    assert receiver.requests == []


def test_secret_values_are_masked_in_notifications(receiver, env):
    register("leaky-secret-in-message")
    notify.notify(_inv(receiver), "failure", "t", "error: leaky-secret-in-message")
    assert b"leaky-secret-in-message" not in receiver.requests[0].body


@pytest.mark.parametrize(("kind", "path"), [("start", "/ping/5f1e-check-uuid-77/start"),
                                             ("success", "/ping/5f1e-check-uuid-77"),
                                             ("fail", "/ping/5f1e-check-uuid-77/fail")])
def test_healthchecks_pings_hit_start_success_and_fail_urls(receiver, env, kind, path):
    d = notify.ping(_inv(receiver), "pg_backup", kind)
    assert d is not None and d.ok
    assert receiver.requests[0].path == path


def test_unconfigured_flow_sends_no_ping(receiver, env):
    assert notify.ping(_inv(receiver), "doctor", "start") is None


def test_unreachable_receiver_is_a_warning_not_an_exception(receiver, env, monkeypatch):
    receiver.status = 500
    d = notify.ping(_inv(receiver), "pg_backup", "fail", body="log tail")
    assert d is not None and not d.ok and "500" in d.detail
    out = notify.notify(_inv(receiver), "failure", "t", "b")
    assert [x.ok for x in out] == [False]


def test_ping_url_accepts_full_urls_and_ids():
    assert notify.ping_url(None, "https://hc.example/abc", "fail") == "https://hc.example/abc/fail"
    assert notify.ping_url("https://hc.example/ping/", "abc", "success") == \
        "https://hc.example/ping/abc"
    with pytest.raises(ValueError):
        notify.ping_url(None, "abc", "start")
