"""The local lab's Docker option (what `make demo` uses): the engine, the registry and two
Compose apps in the inventory; without an engine the lab still starts and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from labkeeper.demo import _compose_jobs, _say_docker
from labkeeper.inventory import load_inventory
from labkeeper.locallab.images import image_id
from labkeeper.locallab.lab import COMPOSE_APPS, LocalLab
from tests.fixtures.lab import alive

pytestmark = pytest.mark.integration


def test_lab_whose_engine_cannot_start_runs_without_compose_apps_and_says_why(
        tmp_path: Path) -> None:
    lab = LocalLab(tmp_path / "lab", postgres=False, s3=False, pvesim=True, sshd=True,
                   docker=True, docker_args=("--storage-driver=nosuchdriver",))
    with lab:
        assert lab.docker is None and lab.images is None
        assert lab.docker_error is not None and "nosuchdriver" in lab.docker_error
        inv = load_inventory(lab.inventory_path)
        assert not [a for a in inv.apps if a.strategy == "compose"]
        assert _compose_jobs(lab, ("labkeeper",), str(lab.inventory_path)) == []
        console = Console(record=True, width=200)
        _say_docker(lab, console, wanted=True)
        said = console.export_text()
        assert "Docker engine: not available" in said and "nosuchdriver" in said
        assert "dockerd" not in lab.pids()


def test_lab_with_docker_runs_its_compose_apps_on_v1_and_the_registry_offers_the_next(
        tmp_path: Path) -> None:
    lab = LocalLab(tmp_path / "lab", postgres=False, s3=False, pvesim=True, sshd=True,
                   docker=True)
    with lab:
        assert lab.docker_error is None, lab.docker_error
        pids = lab.pids()
        assert {"dockerd", "docker-registry", "sshd"} <= set(pids)
        inv = load_inventory(lab.inventory_path)
        apps = {a.name: a for a in inv.apps if a.strategy == "compose"}
        assert set(apps) == set(COMPOSE_APPS)
        for app in apps.values():
            assert app.compose is not None and app.compose.docker_host == lab.docker.host
            assert app.rollback == "compose-images"
        lab.prepare_compose_apps()
        import urllib.request

        for name, offered in COMPOSE_APPS.items():
            url = f"http://127.0.0.1:{lab.app_ports[name]}/version"
            with urllib.request.urlopen(url, timeout=5) as r:
                assert r.read() == b"1\n"
            # The registry offers the next version; the guest has not pulled it.
            assert lab.images.ids[name] == lab.images.ids[offered]
            assert image_id(lab.docker, lab.images.ref(name)) == lab.images.ids["1"]
        engine = lab.docker
    assert lab.docker is None
    assert engine.leftovers() == []
    assert not [n for n, pid in pids.items() if alive(pid)]
