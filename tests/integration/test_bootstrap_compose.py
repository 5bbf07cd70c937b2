"""The Compose bootstrap role on the real engine: a fresh "guest" (this machine, over the
lab's sshd) gets its stack from the inventory (files, or git from a local bare repo),
brings it up healthy, and a second run changes nothing."""

# ruff: noqa: F811 - the `pve` fixture is imported from test_provision and used by name
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from labkeeper import bootstrap as bs
from labkeeper import process
from labkeeper.errors import ServiceError
from labkeeper.locallab.docker import LocalDocker
from labkeeper.locallab.images import AppImages
from labkeeper.locallab.ports import free_port
from tests.integration.test_provision import Pve, lxc, pve  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

COMPOSE_TEMPLATE = """services:
  web:
    image: {image}
    network_mode: host
    restart: unless-stopped
    stop_grace_period: 3s
    environment:
      PORT: "${{PORT}}"
    healthcheck:
      test: ["CMD-SHELL", "wget -q -O /dev/null http://127.0.0.1:${{PORT}}/health || exit 1"]
      interval: 1s
      timeout: 3s
      retries: 2
"""


def _containers(engine: LocalDocker, project: str) -> dict[str, tuple[str, str, str]]:
    """name -> (container ID, StartedAt, health) of the project's containers."""
    ids = engine.docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"
                        ).stdout.split()
    if not ids:
        return {}
    out = {}
    for c in json.loads(engine.docker("inspect", *ids).stdout):
        health = (c["State"].get("Health") or {}).get("Status", "")
        out[c["Name"]] = (c["Id"], c["State"]["StartedAt"], health)
    return out


def _version(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=5) as r:
        return str(r.read().decode().strip())


def _git(*args: str, cwd: Path) -> None:
    process.run(("git", "-c", "user.name=lab", "-c", "user.email=lab@example.org",
                 "-c", "init.defaultBranch=main", *args), timeout=60, cwd=str(cwd))


def _bare_repo(tmp: Path, compose_text: str) -> Path:
    """A bare repository holding compose.yaml on ``main`` (and a work tree to change it)."""
    work, bare = tmp / "stack-src", tmp / "stack.git"
    work.mkdir()
    _git("init", "-q", ".", cwd=work)
    (work / "compose.yaml").write_text(compose_text)
    _git("add", "compose.yaml", cwd=work)
    _git("commit", "-q", "-m", "stack", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(bare), cwd=tmp)
    _git("remote", "add", "origin", str(bare), cwd=work)
    return bare


def _load(pve: Pve, role: dict[str, Any]) -> Any:
    inv = pve.load([lxc("apps", 210, pve, roles=["stack"])], roles={"stack": role})
    return inv, inv.guest("apps")


def test_compose_files_stack_comes_up_healthy_and_a_second_run_recreates_nothing(
        pve: Pve, docker_engine: LocalDocker, app_images: AppImages) -> None:
    port, project = free_port(), "bootfiles"
    app_images.point("boot-files", "1")
    src = pve.workdir / "stacks" / "app"
    src.mkdir(parents=True)
    (src / "compose.yaml").write_text(COMPOSE_TEMPLATE.format(image=app_images.ref("boot-files")))
    stack_dir = pve.workdir / "guest" / "app"
    inv, guest = _load(pve, {"compose": {
        "dir": str(stack_dir), "project": project, "source": "stacks/app",
        "docker_host": docker_engine.host, "environment": {"PORT": str(port)}}})
    state = str(pve.workdir / "guest" / "state")
    try:
        first = bs.run_bootstrap(inv, guest, base_dir=pve.workdir, state_dir=state)
        assert first.status == "changed", first.detail
        assert "deployed bootfiles" in first.detail
        running = _containers(docker_engine, project)
        assert [h for _, _, h in running.values()] == ["healthy"]  # up -d waited for health
        assert _version(port) == "1"

        second = bs.run_bootstrap(inv, guest, base_dir=pve.workdir, state_dir=state)
        assert second.status == "unchanged", second.detail
        assert _containers(docker_engine, project) == running  # same IDs, same StartedAt

        # A stopped container is a stack that is not up: the next run brings it back.
        docker_engine.docker("stop", "-t", "1", *[cid for cid, _, _ in running.values()])
        third = bs.run_bootstrap(inv, guest, base_dir=pve.workdir, state_dir=state)
        assert third.status == "changed", third.detail
        assert [h for _, _, h in _containers(docker_engine, project).values()] == ["healthy"]
    finally:
        docker_engine.docker("compose", "-p", project, "down", "-t", "1", check=False)


def test_compose_git_stack_is_cloned_deployed_then_left_alone_until_the_repo_moves(
        pve: Pve, docker_engine: LocalDocker, app_images: AppImages) -> None:
    port, project = free_port(), "bootgit"
    app_images.point("boot-git", "1")
    compose_text = COMPOSE_TEMPLATE.format(image=app_images.ref("boot-git"))
    bare = _bare_repo(pve.workdir, compose_text)
    stack_dir = pve.workdir / "guest" / "gitapp"
    inv, guest = _load(pve, {"compose": {
        "dir": str(stack_dir), "project": project, "git_url": f"file://{bare}",
        "docker_host": docker_engine.host, "environment": {"PORT": str(port)}}})
    state = str(pve.workdir / "guest" / "state")
    try:
        first = bs.run_bootstrap(inv, guest, base_dir=pve.workdir, state_dir=state)
        assert first.status == "changed", first.detail
        assert "cloned" in first.detail
        assert (stack_dir / "compose.yaml").read_text() == compose_text
        running = _containers(docker_engine, project)
        assert [h for _, _, h in running.values()] == ["healthy"]
        assert _version(port) == "1"

        second = bs.run_bootstrap(inv, guest, base_dir=pve.workdir, state_dir=state)
        assert second.status == "unchanged", second.detail
        assert _containers(docker_engine, project) == running

        # The repository moves to version 2: the next run checks it out and redeploys.
        app_images.point("boot-git-2", "2")
        work = pve.workdir / "stack-src"
        (work / "compose.yaml").write_text(compose_text.replace("boot-git", "boot-git-2"))
        _git("commit", "-q", "-am", "version 2", cwd=work)
        _git("push", "-q", "origin", "main", cwd=work)
        third = bs.run_bootstrap(inv, guest, base_dir=pve.workdir, state_dir=state)
        assert third.status == "changed", third.detail
        assert "checked out" in third.detail and "deployed bootgit" in third.detail
        assert _version(port) == "2"
    finally:
        docker_engine.docker("compose", "-p", project, "down", "-t", "1", check=False)


def test_compose_stack_whose_engine_does_not_answer_fails_saying_so(pve: Pve) -> None:
    src = pve.workdir / "stacks" / "app"
    src.mkdir(parents=True)
    (src / "compose.yaml").write_text("services:\n  web:\n    image: x\n")
    missing = pve.workdir / "no-engine.sock"
    inv, guest = _load(pve, {"compose": {
        "dir": str(pve.workdir / "guest" / "app"), "source": "stacks/app",
        "docker_host": f"unix://{missing}"}})
    with pytest.raises(ServiceError, match=r"Docker engine on apps \(127\.0\.0\.1\) does not "
                                           r"answer at unix://.*no-engine\.sock") as err:
        bs.run_bootstrap(inv, guest, base_dir=pve.workdir,
                         state_dir=str(pve.workdir / "guest" / "state"))
    assert err.value.transient
    assert not (pve.workdir / "guest" / "state" / "compose").exists()
