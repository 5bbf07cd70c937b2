"""The local lab's Docker option (what `make demo` uses): the engine, the registry, two
Compose apps and a containerised database in the inventory; without an engine the lab
still starts and says why."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from cli.demo import _compose_jobs, _db_container_jobs, _say_docker
from labkeeper import drill, pg_backup
from labkeeper.inventory import load_inventory
from labkeeper.locallab.images import image_id
from labkeeper.locallab.lab import COMPOSE_APPS, PG_CONTAINER, PG_CONTAINER_DB, LocalLab
from tests.fixtures.lab import alive

pytestmark = pytest.mark.integration


def test_lab_whose_engine_cannot_start_runs_without_compose_apps_and_says_why(
        tmp_path: Path) -> None:
    lab = LocalLab(tmp_path / "lab", postgres=False, s3=False, pvesim=True, sshd=True,
                   docker=True, docker_args=("--storage-driver=nosuchdriver",))
    with lab:
        assert lab.docker is None and lab.images is None and lab.db_container is None
        assert lab.docker_error is not None and "nosuchdriver" in lab.docker_error
        assert lab.db_container_error is not None and "nosuchdriver" in lab.db_container_error
        inv = load_inventory(lab.inventory_path)
        assert not [a for a in inv.apps if a.strategy == "compose"]
        assert not [d for d in inv.databases if d.container is not None]
        assert _compose_jobs(lab, ("labkeeper",), str(lab.inventory_path)) == []
        assert _db_container_jobs(lab, ("labkeeper",), str(lab.inventory_path)) == []
        console = Console(record=True, width=200)
        _say_docker(lab, console, wanted=True)
        said = console.export_text()
        assert "Docker engine: not available" in said and "nosuchdriver" in said
        assert "containerised database are skipped" in said
        assert "dockerd" not in lab.pids()


@pytest.fixture(scope="module")
def docker_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLab]:
    """The lab as the demo starts it with an engine (no PostgreSQL of its own): on exit
    no daemon, container or lab process is left."""
    lab = LocalLab(tmp_path_factory.mktemp("dockerlab") / "lab", postgres=False, s3=True,
                   pvesim=True, sshd=True, docker=True)
    with lab:
        assert lab.docker_error is None, lab.docker_error
        assert lab.db_container_error is None, lab.db_container_error
        pids = lab.pids()
        engine = lab.docker
        yield lab
    assert lab.docker is None and lab.db_container is None
    assert engine.leftovers() == []
    assert not [n for n, pid in pids.items() if alive(pid)]


def test_lab_with_docker_runs_its_compose_apps_on_v1_and_the_registry_offers_the_next(
        docker_lab: LocalLab) -> None:
    lab = docker_lab
    assert {"dockerd", "docker-registry", "sshd"} <= set(lab.pids())
    inv = load_inventory(lab.inventory_path)
    apps = {a.name: a for a in inv.apps if a.strategy == "compose"}
    assert set(apps) == set(COMPOSE_APPS)
    for app in apps.values():
        assert app.compose is not None and app.compose.docker_host == lab.docker.host
        assert app.rollback == "compose-images"
    lab.prepare_compose_apps()
    for name, offered in COMPOSE_APPS.items():
        url = f"http://127.0.0.1:{lab.app_ports[name]}/version"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.read() == b"1\n"
        # The registry offers the next version; the guest has not pulled it.
        assert lab.images.ids[name] == lab.images.ids[offered]
        assert image_id(lab.docker, lab.images.ref(name)) == lab.images.ids["1"]


def test_lab_container_database_is_backed_up_by_docker_exec_and_its_drill_passes(
        docker_lab: LocalLab) -> None:
    lab = docker_lab
    inv = load_inventory(lab.inventory_path)
    db = inv.database(PG_CONTAINER_DB)
    assert db.container is not None and db.container.name == PG_CONTAINER
    assert db.container.docker_host == lab.docker.host and db.password is None
    assert inv.database_server(PG_CONTAINER_DB) == f"labhost/{PG_CONTAINER}"
    jobs = _db_container_jobs(lab, ("labkeeper",), str(lab.inventory_path))
    assert [j.argv[1:4] for j in jobs] == [("drill", "run", f"db:{PG_CONTAINER_DB}")]
    result = pg_backup.backup_database(inv, PG_CONTAINER_DB)
    assert result.table_count == 2 and result.total_rows == 60 + 6000  # albums, assets
    label = pg_backup.server_label(inv, db)
    glob = pg_backup.backup_globals(inv, label, [PG_CONTAINER_DB])
    assert glob.status == "ok", glob.detail  # postgres in the box reads role passwords
    repo = pg_backup.open_repo(inv, "lab-repo")
    stored = pg_backup.find_latest_backup(repo, lab=inv.lab.name,
                                          server=inv.database_server(PG_CONTAINER_DB),
                                          name=PG_CONTAINER_DB)
    assert stored is not None and stored.backup_id == result.backup_id
    manifest = pg_backup.read_manifest(repo, stored)
    assert manifest.server_version.startswith("17.")
    assert manifest.pg_dump_version.startswith("17.")  # the container's own pg_dump
    drilled = drill.database_drill(inv, PG_CONTAINER_DB)
    assert drilled.passed, drilled.summary()
    assert any(c.name == "smoke assets exist" and c.ok for c in drilled.checks), drilled.checks
