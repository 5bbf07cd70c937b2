"""``labkeeper restore pitr SERVER --to ... --on DRILL-SERVER`` (PostgreSQL 15, restic,
moto S3): the recovery runs in a scratch cluster here; the recovered databases land on
a second PostgreSQL server (the inventory's drill server) as ``labkeeper_drill_*``
databases holding exactly the rows committed before the target; the scratch cluster
is removed; the live server gets nothing."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app as cli_app
from labkeeper.locallab.lab import write_secret
from labkeeper.locallab.postgres import LocalPostgres
from tests.integration.pitr_support import DB
from tests.integration.test_pitr_live_restore import OTHER, Scene, build_scene

pytestmark = pytest.mark.integration

DRILL = "drill2"


@pytest.fixture(scope="module")
def scene() -> Iterator[tuple[Scene, LocalPostgres]]:
    workdir = Path(tempfile.mkdtemp(prefix="labkeeper-pitr-on-"))
    sc = receiver = None
    drill_pg = LocalPostgres(workdir / "drillpg", databases=())
    try:
        sc, receiver = build_scene(workdir)
        drill_pg.start()
        secret = workdir / "drill-password"
        write_secret(secret, drill_pg.password_file.read_text().strip())
        data = yaml.safe_load(sc.lab_file.read_text())
        data["drills"]["servers"].append({
            "name": DRILL, "host": drill_pg.host, "port": drill_pg.port,
            "user": drill_pg.app_user, "password": f"file:{secret}"})
        sc.lab_file.write_text(yaml.safe_dump(data))
        yield sc, drill_pg
    finally:
        if receiver is not None:
            receiver.stop()
        drill_pg.stop()
        if sc is not None:
            sc.plab.lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _databases(pg: LocalPostgres, like: str) -> list[str]:
    out = pg.psql_super(f"SELECT datname FROM pg_database WHERE datname LIKE '{like}' "
                        "ORDER BY 1;")
    return out.split()


def test_on_a_drill_server_copies_every_recovered_database_there(
        scene: tuple[Scene, LocalPostgres]) -> None:
    sc, drill_pg = scene
    live_before = _databases(sc.plab.pg, "%")
    res = CliRunner().invoke(cli_app, ["restore", "pitr", "pg1", "--to", sc.to,
                                       "--on", DRILL, "--lab", str(sc.lab_file)])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout.splitlines()[0])
    copies = {c["database"]: c for c in row["copies"]}
    assert set(copies) == {DB, OTHER}, row
    for c in copies.values():
        assert c["copy"].startswith(f"labkeeper_drill_{c['database']}_"), c
        assert f"drill server {DRILL}" in c["where"], c
    got = drill_pg.psql_super("SELECT id FROM ticks ORDER BY id;", db=copies[DB]["copy"])
    assert [int(x) for x in got.split()] == sc.before  # as of the target
    other = drill_pg.psql_super("SELECT count(*) FROM t;", db=copies[OTHER]["copy"])
    assert int(other) == 0  # its rows came after the target
    assert sorted(_databases(drill_pg, "labkeeper\\_drill\\_%")) == sorted(
        c["copy"] for c in copies.values())
    assert _databases(sc.plab.pg, "%") == live_before  # nothing on the live server
    assert sc.restores_left() == [], "the scratch cluster was not removed"
    assert f"{copies[DB]['copy']} on drill server {DRILL}" in res.stdout


def test_on_a_drill_server_with_database_copies_only_that_one(
        scene: tuple[Scene, LocalPostgres]) -> None:
    sc, drill_pg = scene
    before = _databases(drill_pg, "labkeeper\\_drill\\_%")
    res = CliRunner().invoke(cli_app, ["restore", "pitr", "pg1", "--to", sc.to, "--on", DRILL,
                                       "--database", DB, "--lab", str(sc.lab_file)])
    assert res.exit_code == 0, res.output
    [copy] = json.loads(res.stdout.splitlines()[0])["copies"]
    assert copy["database"] == DB and copy["rows"] == len(sc.before)
    assert sorted(_databases(drill_pg, "labkeeper\\_drill\\_%")) == sorted(
        [*before, copy["copy"]])


def test_on_an_unknown_drill_server_fails_before_any_restore(
        scene: tuple[Scene, LocalPostgres]) -> None:
    sc, _drill_pg = scene
    res = CliRunner().invoke(cli_app, ["restore", "pitr", "pg1", "--to", sc.to,
                                       "--on", "nowhere", "--lab", str(sc.lab_file)])
    assert res.exit_code == 2, res.output
    assert "nowhere" in res.output
    assert sc.restores_left() == []
