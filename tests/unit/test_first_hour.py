"""A new user's first hour, the pure parts: per-user default places, RESTIC_CACHE_DIR
honoured, errors naming the database address actually used."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkeeper import pg_backup, postgres
from labkeeper.errors import ConfigError
from labkeeper.inventory import parse_inventory
from labkeeper.userdirs import SYSTEM_STATE_DIR, choose


def _choose(*, euid: int, environ: dict[str, str], usable: bool = False) -> Path:
    return choose(SYSTEM_STATE_DIR, xdg_var="XDG_STATE_HOME", xdg_fallback=".local/state",
                  tail="labkeeper", euid=euid, environ=environ, usable=lambda _p: usable)


def test_root_gets_the_system_state_dir():
    assert _choose(euid=0, environ={"HOME": "/root"}) == Path("/var/lib/labkeeper")


def test_a_user_who_can_use_the_system_place_keeps_it():
    assert _choose(euid=999, environ={"HOME": "/home/lk"}, usable=True) == SYSTEM_STATE_DIR


def test_another_user_gets_the_xdg_state_home_or_its_default_under_home():
    assert _choose(euid=1000, environ={"HOME": "/home/ann"}) == \
        Path("/home/ann/.local/state/labkeeper")
    assert _choose(euid=1000, environ={"HOME": "/home/ann", "XDG_STATE_HOME": "/data/st"}) == \
        Path("/data/st/labkeeper")


def test_a_relative_xdg_variable_is_ignored_as_the_spec_says():
    assert _choose(euid=1000, environ={"HOME": "/home/ann", "XDG_STATE_HOME": "rel"}) == \
        Path("/home/ann/.local/state/labkeeper")


def test_a_user_without_a_home_gets_the_system_place_and_its_error_later():
    assert _choose(euid=1000, environ={}) == SYSTEM_STATE_DIR


INV = """
version: 1
lab: {name: homelab}
settings: {state_dir: /srv/lk}
repositories:
  - {name: main, url: /srv/restic, password: "env:RP"}
  - {name: pinned, url: /srv/restic2, password: "env:RP", cache_dir: /var/cache/pinned}
"""


def test_restic_cache_dir_from_the_environment_is_used_when_the_inventory_sets_none():
    inv = parse_inventory(INV, "lab.yaml")
    assert pg_backup.repo_cache_dir(inv, "main", {"RESTIC_CACHE_DIR": "/home/ann/.cache/restic"}
                                    ) == Path("/home/ann/.cache/restic")
    assert pg_backup.repo_cache_dir(inv, "main", {}) == Path("/srv/lk/cache/main")


def test_a_cache_dir_written_in_the_inventory_wins_over_the_environment():
    inv = parse_inventory(INV, "lab.yaml")
    env = {"RESTIC_CACHE_DIR": "/elsewhere"}
    assert pg_backup.repo_cache_dir(inv, "pinned", env) == Path("/var/cache/pinned")
    inv2 = parse_inventory(INV.replace("state_dir: /srv/lk", "cache_dir: /var/cache/lk"),
                           "lab.yaml")
    assert pg_backup.repo_cache_dir(inv2, "main", env) == Path("/var/cache/lk/main")


CONN = postgres.Conn(host="127.0.0.1", port=5433, dbname="appdb", user="backup")


@pytest.mark.parametrize(("message", "expected"), [
    ("psql failed on localhost (exit 2: connection to the server failed): Is the server "
     "running?", "psql failed for 127.0.0.1:5433/appdb (exit 2: connection to the server "
                 "failed): Is the server running?"),
    ("psql ended the session unexpectedly",
     "psql ended the session unexpectedly (127.0.0.1:5433/appdb)"),
    ("could not reach 127.0.0.1:5433/appdb", "could not reach 127.0.0.1:5433/appdb"),
])
def test_a_postgres_error_names_the_server_address_actually_used(message, expected):
    assert postgres.name_server(message, CONN) == expected
    assert "localhost" not in postgres.name_server(message, CONN)


def test_a_state_dir_that_cannot_be_created_fails_saying_what_to_set(tmp_path, monkeypatch):
    monkeypatch.delenv("RESTIC_CACHE_DIR", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    inv = parse_inventory(INV.replace("/srv/lk", str(blocker / "state")), "lab.yaml")
    with pytest.raises(ConfigError) as caught:
        pg_backup.open_repo(inv, "main")
    assert str(blocker / "state" / "cache" / "main") in str(caught.value)
    assert "settings.cache_dir or settings.state_dir" in str(caught.value)
