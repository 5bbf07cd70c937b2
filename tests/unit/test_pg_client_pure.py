"""Pure parts of the client choice (issue 23) and of containerised databases (issue 17)."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import SecretStr

from labkeeper import pg_backup, pg_client, pg_container, postgres, sshpipe
from labkeeper.inventory import Inventory, validate_text
from labkeeper.locallab import pgimage
from tests.unit.test_inventory import BASE


def _inv(extra_db: dict) -> dict:
    data = yaml.safe_load(BASE)
    data["databases"].append(extra_db)
    return data


CONTAINER_DB = {"name": "photos", "guest": "app1", "dbname": "immich", "repository": "b2-main",
                "container": {"name": "immich_postgres"}}


def test_same_major_client_is_chosen_when_installed():
    assert pg_client.choose_client(15, {13: Path("a"), 15: Path("b"), 17: Path("c")}) == 15


def test_newest_newer_client_is_chosen_when_the_same_major_is_missing():
    assert pg_client.choose_client(16, {15: Path("a"), 17: Path("b"), 18: Path("c")}) == 18


def test_no_client_is_chosen_when_every_installed_one_is_older_than_the_server():
    assert pg_client.choose_client(17, {13: Path("a"), 15: Path("b")}) is None


def test_major_of_server_version_num():
    assert pg_client.major_of(170012) == 17 and pg_client.major_of(150018) == 15


def test_missing_client_message_names_the_package_the_address_and_what_is_installed():
    msg = pg_client.missing_client_message(17, "127.0.0.1:5433", {15: Path("/x/15/bin")},
                                          Path("/usr/lib/postgresql"))
    assert "postgresql-client-17" in msg and "127.0.0.1:5433" in msg and "installed: 15" in msg


def test_installed_clients_lists_only_major_dirs_with_the_three_tools(tmp_path):
    for major, tools in ((15, ("pg_dump", "psql", "pg_restore")), (16, ("psql",))):
        (tmp_path / str(major) / "bin").mkdir(parents=True)
        for t in tools:
            f = tmp_path / str(major) / "bin" / t
            f.write_text("#!/bin/sh\n")
            f.chmod(0o755)
    (tmp_path / "common").mkdir()
    assert pg_client.installed_clients(tmp_path) == {15: tmp_path / "15" / "bin"}


def test_client_bindir_and_prefix_shape_every_tool_argv_without_secrets():
    client = postgres.Client(bindir="/opt/pg/17/bin", prefix=("wrap", "--"))
    conn = postgres.Conn(host="h", port=5, dbname="d", user="u",
                         password=SecretStr("pw-s3cr3t"), client=client)
    argv = postgres.pg_dump_argv(conn, snapshot="00000003-000000BB-1")
    assert argv[:3] == ("wrap", "--", "/opt/pg/17/bin/pg_dump")
    assert postgres.psql_argv(conn)[2] == "/opt/pg/17/bin/psql"
    assert "pw-s3cr3t" not in " ".join(argv + postgres.psql_argv(conn))
    assert conn.env()["PGPASSWORD"] == "pw-s3cr3t"


def test_default_client_keeps_the_plain_tool_names():
    conn = postgres.Conn(host="h", port=5, dbname="d", user="u")
    assert postgres.pg_dump_argv(conn)[0] == "pg_dump" and postgres.psql_argv(conn)[0] == "psql"


def test_docker_exec_prefix_passes_env_names_never_values():
    inv = Inventory.model_validate(_inv({**CONTAINER_DB, "password": "env:PG_PHOTOS_PW",
                                         "container": {"name": "immich_postgres",
                                                       "docker_host": "unix:///run/d.sock"}}))
    db = inv.database("photos")
    prefix = pg_container.docker_exec_prefix(db.container)
    assert prefix[:3] == ("docker", "--host", "unix:///run/d.sock")
    assert prefix[-1] == "immich_postgres"
    assert ("-e", "PGPASSWORD") == prefix[prefix.index("PGPASSWORD") - 1:
                                          prefix.index("PGPASSWORD") + 1]
    assert not any("=" in a for a in prefix)


def test_container_database_on_a_guest_runs_its_tools_through_the_ssh_bridge(monkeypatch):
    monkeypatch.setenv("PG_PHOTOS_PW", "pw-in-env-only")
    inv = Inventory.model_validate(_inv({**CONTAINER_DB, "password": "env:PG_PHOTOS_PW"}))
    conn = pg_backup.conn_for(inv, inv.database("photos"))
    argv = postgres.pg_dump_argv(conn)
    assert argv[:3] == (sys.executable, "-m", "labkeeper.sshpipe")
    i = argv.index("docker")
    assert argv[i:i + 2] == ("docker", "exec") and "pg_dump" in argv[i:]
    assert conn.host == "/var/run/postgresql" and conn.dbname == "immich"
    assert "pw-in-env-only" not in " ".join(argv)
    env = conn.env()
    assert env["PGPASSWORD"] == "pw-in-env-only" and sshpipe.TARGET_ENV in env
    assert "pw-in-env-only" not in env[sshpipe.TARGET_ENV]


def test_container_database_on_localhost_runs_docker_here_without_ssh():
    data = _inv({**CONTAINER_DB, "guest": None, "host": "localhost"})
    del data["databases"][-1]["guest"]
    inv = Inventory.model_validate(data)
    argv = postgres.psql_argv(pg_backup.conn_for(inv, inv.database("photos")))
    assert argv[0] == "docker" and "labkeeper.sshpipe" not in argv


def test_container_database_series_names_the_container():
    inv = Inventory.model_validate(_inv(CONTAINER_DB))
    assert inv.database_server("photos") == "app1/immich_postgres"


def test_container_database_on_an_unknown_ssh_host_is_an_inventory_error():
    data = _inv({**CONTAINER_DB, "host": "nowhere"})
    del data["databases"][-1]["guest"]
    problems = validate_text(yaml.safe_dump(data))
    assert any("nowhere" in p.message and "SSH host" in p.message for p in problems)


def test_container_database_on_a_guest_without_ssh_is_an_inventory_error():
    data = _inv(CONTAINER_DB)
    data = copy.deepcopy(data)
    del data["guests"][1]["ssh"]
    problems = validate_text(yaml.safe_dump(data))
    assert any("has no ssh section" in p.message for p in problems)


def test_dump_of_a_newer_server_is_refused_for_an_older_restore_target():
    why = pg_container.restore_target_problem("17.12 (Debian 17.12-0+deb13u1)", 15)
    assert why and "PostgreSQL 17" in why and "15" in why
    assert pg_container.restore_target_problem("15.18", 17) is None
    assert pg_container.restore_target_problem("17.2", 17) is None


def test_bridge_prefix_carries_names_and_the_target_carries_references_only():
    prefix = sshpipe.bridge_prefix(env_names=("PGPASSWORD",), timeout=30)
    assert prefix[-1] == "--" and ("--env", "PGPASSWORD") == prefix[-3:-1]

    class T:
        name, host, key, known_hosts, port, user = "g", "10.0.0.2", "file:/k", "/kh", 22, "root"
        trust_on_first_use, connect_timeout, key_passphrase, host_key = False, 5.0, None, None
    assert '"key": "file:/k"' in sshpipe.target_json(T())


def test_image_recipe_key_changes_with_the_recipe_and_argv_is_mmdebstrap_minbase():
    other = pgimage.Recipe(packages=("postgresql-17", "less"))
    assert other.key != pgimage.PG17.key and other.tag != pgimage.PG17.tag
    argv = pgimage.mmdebstrap_argv(pgimage.PG17, Path("/c/x.tar"))
    assert argv[:2] == ("mmdebstrap", "--variant=minbase")
    assert "--include=postgresql-17" in argv and argv[-3:] == ("trixie", "/c/x.tar",
                                                               pgimage.DEFAULT_MIRROR)


def test_cached_tarball_with_a_matching_stamp_is_not_rebuilt(tmp_path):
    recipe = pgimage.Recipe(name="t")
    (tmp_path / "t.tar").write_bytes(b"x")
    (tmp_path / "t.stamp.json").write_text(__import__("json").dumps(recipe.stamp()))
    assert pgimage.rootfs_tarball(recipe, cache=tmp_path).built is False


@pytest.mark.parametrize("stamp", ["{}", "not json"])
def test_cached_tarball_with_a_stale_stamp_is_rebuilt(tmp_path, stamp, monkeypatch):
    recipe = pgimage.Recipe(name="t")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "t.tar").write_bytes(b"old")
    (cache / "t.stamp.json").write_text(stamp)
    bindir = tmp_path / "bin"  # a stand-in mmdebstrap on PATH that writes its output
    bindir.mkdir()
    fake = bindir / "mmdebstrap"
    fake.write_text('#!/bin/sh\nfor a; do out="$prev"; prev="$a"; done\n'
                    'echo new > "$out"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    built = pgimage.rootfs_tarball(recipe, cache=cache)
    assert built.built is True and (cache / "t.tar").read_text() == "new\n"
    assert pgimage.rootfs_tarball(recipe, cache=cache).built is False
