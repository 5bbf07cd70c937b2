"""`labkeeper status` on updates: pinned apps, unfinished updates, blocked runs."""

from __future__ import annotations

from datetime import UTC, datetime

from labkeeper import metrics, status
from labkeeper import update as core
from labkeeper.inventory import parse_inventory

LAB = """
version: 1
lab: {name: t}
apps: []
"""


def rows_for(**facts):
    inv = parse_inventory(LAB)
    return status.evaluate(inv, status.Facts(now=datetime(2026, 3, 7, tzinfo=UTC), **facts))


def test_a_pinned_app_shows_as_pinned_with_what_it_will_not_deploy():
    pin = core.Pin("immich", "r1", 1_700_000_000.0, images={"server": "sha256:i"},
                   refs={"server": "ghcr.io/immich-app/immich-server:release"},
                   digests={"server": "sha256:" + "a" * 64},
                   bad={"server": ["sha256:" + "b" * 64]})
    (row,) = rows_for(pins=[pin])
    assert (row.section, row.target, row.state) == ("update", "immich pinned", "warn")
    assert "pinned to server=sha256:aaaaaaaaaaaa" in row.detail
    assert "not deploying sha256:bbbbbbbbbbbb" in row.detail


def test_a_stale_unfinished_update_fails_status_and_says_how_to_decide():
    prot = core.Protection("snapshot", "pve1", 300, "lxc", snapshot="s")
    j = core.Journal("web", "r1", "updated", prot, touched=1_700_000_000.0)
    (stale,) = rows_for(journals=[(j, True)])
    assert stale.state == "failed" and "--resolve keep|rollback" in stale.detail
    assert status.exit_code([stale]) == 1
    (fresh,) = rows_for(journals=[(j, False)])
    assert fresh.state == "warn" and "next update run finishes it" in fresh.detail


def test_a_blocked_update_run_is_not_shown_as_the_previous_runs_success():
    samples = [metrics.Sample("labkeeper_update_success", {"app": "web"}, 0),
               metrics.Sample("labkeeper_update_rolled_back", {"app": "web"}, 0),
               metrics.Sample("labkeeper_update_blocked", {"app": "web"}, 1),
               metrics.Sample("labkeeper_update_last_run_timestamp_seconds", {"app": "web"},
                              1_700_000_000.0)]
    (row,) = rows_for(metrics=samples)
    assert row.state == "failed" and row.detail.startswith("blocked")
