"""The real Docker engine in the local lab: start/stop, images built here, Compose over
the lab's sshd, pulls from the loopback registry, and real ``compose ps`` JSON."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from labkeeper import compose
from labkeeper.locallab.docker import EngineError, LocalDocker
from labkeeper.locallab.images import AppImages, image_id
from labkeeper.locallab.ports import free_port
from labkeeper.ssh import SshClient
from tests.fixtures.docker import ComposeApp
from tests.fixtures.lab import alive

pytestmark = pytest.mark.integration


def _get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def _wait_answer(url: str, timeout: float = 30.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _wait_health(app: ComposeApp, want: str, timeout: float = 60.0) -> list[compose.Container]:
    deadline = time.monotonic() + timeout
    while True:
        containers = app.ps()
        if containers and all(c.health_state == want for c in containers):
            return containers
        if time.monotonic() > deadline:
            raise AssertionError(f"{app.name} not {want} after {timeout:g}s: "
                                 f"{[(c.name, c.state, c.status) for c in containers]}")
        time.sleep(0.2)


def test_engine_runs_a_container_and_stop_leaves_no_process_or_mount(tmp_path: Path,
                                                                     app_images: AppImages
                                                                     ) -> None:
    # A second, private engine (the session's one stays up): start, run a container
    # from an image built here, stop, and nothing of it is left.
    engine = LocalDocker(tmp_path / "engine").start()
    try:
        assert engine.start_seconds < 60
        port = free_port()
        saved = tmp_path / "app.tar"
        app_images.engine.docker("save", "-o", str(saved), app_images.ref("1"), timeout=120)
        engine.docker("load", "-i", str(saved), timeout=120)
        engine.docker("run", "-d", "--network", "host", "-e", f"PORT={port}",
                      app_images.ref("1"), timeout=60)
        assert _wait_answer(f"http://127.0.0.1:{port}/version") == (200, "1\n")
        running = engine.pids()
        assert len(running) >= 4  # dockerd, containerd, a shim, the container's PID 1
    finally:
        engine.stop()
    assert engine.leftovers() == []
    assert not [pid for pid in running if alive(pid)]
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/version", timeout=1)


def test_engine_that_cannot_start_raises_with_dockerd_own_words(tmp_path: Path) -> None:
    engine = LocalDocker(tmp_path / "engine", extra_args=("--storage-driver=nosuchdriver",))
    with pytest.raises(EngineError) as err:
        engine.start()
    text = str(err.value)
    assert "dockerd exited with" in text
    assert "nosuchdriver" in text
    assert engine.leftovers() == []


def test_app_versions_serve_their_pages_and_the_bad_one_turns_unhealthy(
        docker_engine: LocalDocker, app_images: AppImages) -> None:
    good, bad = free_port(), free_port()
    ids = []
    try:
        for version, port in (("2", good), ("2-bad", bad)):
            ids.append(docker_engine.docker(
                "run", "-d", "--network", "host", "-e", f"PORT={port}",
                app_images.ref(version), timeout=60).stdout.strip())
        assert _wait_answer(f"http://127.0.0.1:{good}/health") == (200, "ok\n")
        assert _get(f"http://127.0.0.1:{good}/version") == (200, "2\n")
        assert _wait_answer(f"http://127.0.0.1:{bad}/version") == (200, "2-bad\n")
        assert _get(f"http://127.0.0.1:{bad}/health")[0] == 404
        deadline = time.monotonic() + 60
        while True:
            states = docker_engine.docker(
                "inspect", "--format", "{{.State.Health.Status}}", *ids).stdout.split()
            if states == ["healthy", "unhealthy"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert states == ["healthy", "unhealthy"]
    finally:
        docker_engine.docker("rm", "-f", *ids, check=False)


def test_compose_up_wait_over_ssh_brings_the_stack_up_healthy(
        compose_app: Callable[..., ComposeApp], ssh_client: SshClient) -> None:
    app = compose_app(version="1")
    argv = (*compose.up_argv(app.compose_cfg()), "--wait")
    assert argv[:3] == ("docker", "--host", app.docker_host)
    ssh_client.run(argv, timeout=120)
    ps = ssh_client.run(compose.ps_argv(app.compose_cfg()), timeout=60)
    containers = compose.parse_ps(ps.stdout)
    assert [(c.service_name, c.state, c.health_state) for c in containers] == \
        [("web", "running", "healthy")]
    assert compose.container_health(containers).ok
    assert app.version() == "1"


def test_compose_pull_over_ssh_fetches_the_version_the_registry_now_offers(
        compose_app: Callable[..., ComposeApp], app_images: AppImages,
        docker_engine: LocalDocker, ssh_client: SshClient) -> None:
    app = compose_app(tag="pulltest", version="1")
    cfg = app.compose_cfg()
    ssh_client.run((*compose.up_argv(cfg), "--wait"), timeout=120)
    assert app.version() == "1"
    before = {c.service_name: c.image_id for c in app.ps()}
    app_images.point("pulltest", "2")  # the registry now offers version 2
    assert image_id(docker_engine, app.image) == app_images.ids["1"]  # not pulled yet
    began = time.monotonic()
    ssh_client.run(compose.pull_argv(cfg), timeout=120)
    assert image_id(docker_engine, app.image) == app_images.ids["2"]
    ssh_client.run((*compose.up_argv(cfg), "--wait"), timeout=120)
    took = time.monotonic() - began
    app.wait_version("2")
    after = {c.service_name: c.image_id for c in app.ps()}
    assert before["web"] != after["web"]
    assert after["web"] == app_images.ids["2"]
    assert took < 60


def test_compose_ps_json_from_the_real_engine_parses_healthy_and_unhealthy(
        compose_app: Callable[..., ComposeApp]) -> None:
    good = compose_app(tag="psgood", version="1")
    bad = compose_app(tag="psbad", version="2-bad")
    good.run("up", "-d")
    bad.run("up", "-d")
    healthy = _wait_health(good, "healthy")
    unhealthy = _wait_health(bad, "unhealthy")
    assert healthy[0].image_id and healthy[0].image_id.startswith("sha256:")
    assert healthy[0].project == good.project
    assert compose.container_health(healthy).ok
    verdict = compose.container_health(unhealthy)
    assert not verdict.ok
    assert "unhealthy" in verdict.detail


def test_badhttp_version_is_healthy_to_docker_while_its_health_page_is_gone(
        compose_app: Callable[..., ComposeApp]) -> None:
    # Only an HTTP probe notices this one: the image's own HEALTHCHECK (kept by the stack,
    # which sets none) probes /alive.
    app = compose_app(tag="badhttp", version="2-badhttp")
    app.run("up", "-d", "--wait")
    assert [c.health_state for c in app.ps()] == ["healthy"]
    assert _get(app.health_url)[0] == 404
    assert app.version() == "2-badhttp"
