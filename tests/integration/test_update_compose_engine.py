"""Compose updates on a real Docker engine (issue 17): good, bad → rollback that lasts,
a pin that holds back the bad digest, a pruned old image, a failed pull, a crash.

- the engine: Debian's dockerd on a private socket (``tests/fixtures/docker.py``),
  host networking; the lab app's images in a loopback registry;
- the guest: this machine, reached over the local sshd (labkeeper runs
  ``docker --host ... compose ...`` over SSH);
- Proxmox: the simulator of ``test_update_flow`` (only the ``snapshot`` test uses it);
- Prefect: the session's server.

Each stack has its own tag in the registry (``point(tag, version)`` is "the registry
now offers a new version"); ``forget(tag)`` drops the engine's local tag so that the
update really pulls.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.jobs import run_update_cli
from flows.update import update_app_flow
from labkeeper import status
from labkeeper import update as core
from labkeeper.errors import is_transient
from labkeeper.locallab.docker import LocalDocker, LocalRegistry
from labkeeper.locallab.images import AppImages
from tests.fixtures.docker import ComposeApp
from tests.integration.test_doctor_flow import _flow_run_record
from tests.integration.test_update_flow import UpdLab, result_rows, upd  # noqa: F401

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
GATE = {"initial_delay": 0, "interval": 0.5, "deadline": 20, "successes": 2}


def container_id(app: ComposeApp) -> str:
    (c,) = [c for c in app.ps() if c.service_name == "web"]
    return c.id


def image_of(app: ComposeApp) -> str:
    (c,) = [c for c in app.ps() if c.service_name == "web"]
    return c.image_id or ""


def started(app: ComposeApp, version: str) -> ComposeApp:
    app.run("up", "-d", "--wait", timeout=120)
    app.wait_version(version)
    return app


@pytest.fixture
def stack(upd: UpdLab, compose_app: Callable[..., ComposeApp],  # noqa: F811
          app_images: AppImages) -> Callable[..., tuple[ComposeApp, Path]]:
    """``stack(tag, **app_overrides)``: a Compose app running version 1 from ``tag``,
    written into an inventory whose guest is this machine (over SSH)."""
    def make(tag: str, vmid: int, **over: Any) -> tuple[ComposeApp, Path]:
        app = started(compose_app(tag=tag, version="1"), "1")
        upd.guest("g", vmid)
        entry = app.app_entry("g", **{"gate": GATE, **over})
        return app, upd.write([entry])
    return make


def offer(app_images: AppImages, tag: str, version: str) -> str:
    """The registry now offers ``version`` as ``tag`` (and the engine must pull it)."""
    digest = app_images.point(tag, version)
    app_images.forget(tag)
    return digest


# ------------------------------------------------------------------------------- good


def test_good_update_pulls_recreates_gates_and_records_digests(stack, app_images,
                                                                prefect_harness):
    app, path = stack("u-good", 700)
    v1 = image_of(app)
    digest2 = offer(app_images, "u-good", "2")
    state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert state.is_completed(), state.message
    (row,) = result_rows(state)
    assert row["status"] == "updated", row
    app.wait_version("2")
    assert image_of(app) == app_images.ids["2"] != v1
    assert app_images.digest("1")[:19] in row["before"]
    assert digest2[:19] in row["after"] and digest2[:19] in row["attempted"]
    _run, _logs, arts = _flow_run_record(state)
    summary = next(a for a in arts if a.key == "update-summary").data
    assert "| service | before | after |" in summary
    assert f"| web | {app_images.digest('1')} | {digest2} |" in summary
    assert "protect" in summary and "gate" in summary  # timings per step
    keep = f"{app_images.name}:labkeeper-keep-{app.name}-web"
    assert app.engine.docker("image", "inspect", "--format", "{{.Id}}", keep
                             ).stdout.strip() == v1, "the old image was not kept by a tag"
    assert not core.journal_path(load(path), app.name).exists()

    again = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert again.is_completed()
    (row,) = result_rows(again)
    assert row["status"] == "current" and row["protection"] == ""


def load(path: Path) -> Any:
    from labkeeper.inventory import load_inventory

    return load_inventory(path)


# ------------------------------------------------------------------------------- bad


def test_bad_update_rolls_back_lastingly_holds_the_bad_digest_then_a_good_one_lands(
        stack, app_images, prefect_harness, capsys):
    app, path = stack("u-bad", 701)
    inv = load(path)
    v1 = image_of(app)
    bad = offer(app_images, "u-bad", "2-bad")

    state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert state.is_failed() and state.name == "RolledBack", (state.name, state.message)
    (row,) = result_rows(state)
    assert row["status"] == "rolled-back" and "healthy again" in row["detail"]
    app.wait_version("1")
    assert image_of(app) == v1
    # the rollback lasts: a plain `up -d` (a person, the bootstrap role) keeps version 1
    app.run("up", "-d", "--wait", timeout=120)
    assert image_of(app) == v1 and app.version() == "1"
    pin = core.read_pin(inv, app.name)
    assert pin is not None and bad in pin.bad_digests()
    rows = status.evaluate(inv, status.gather(inv))
    pinned = [r for r in rows if r.section == "update" and r.target == f"{app.name} pinned"]
    assert pinned and pinned[0].state == "warn" and "pinned to web=" in pinned[0].detail

    # the next run finds the same bad digest: held, loudly, nothing recreated
    before = container_id(app)
    held = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert held.is_failed() and held.name == "NotUpdated", (held.name, held.message)
    (row,) = result_rows(held)
    assert row["status"] == "held" and "rolled back before" in row["detail"]
    assert container_id(app) == before and app.version() == "1"
    app.run("up", "-d", timeout=120)  # still pinned after the pull put the tag back
    assert image_of(app) == v1
    assert run_update_cli(path, [app.name], dry_run=False, force=False) == 3
    assert "held" in capsys.readouterr().out

    # a new digest in the registry: a normal update, and the pin is gone
    offer(app_images, "u-bad", "2")
    good = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert good.is_completed(), good.message
    (row,) = result_rows(good)
    assert row["status"] == "updated" and "pin removed" in row["detail"]
    app.wait_version("2")
    assert core.read_pin(inv, app.name) is None


def test_rollback_pulls_back_a_pruned_old_image_by_its_digest(stack, app_images,
                                                             docker_engine: LocalDocker,
                                                             prefect_harness):
    app, path = stack("u-prune", 702, gate={**GATE, "initial_delay": 5})
    inv = load(path)
    v1 = image_of(app)
    offer(app_images, "u-prune", "2-bad")
    removed = threading.Event()

    def prune_when_updated() -> None:  # a person's `docker image rm -f` during the gate
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            journal = core.read_journal(inv, app.name) \
                if core.journal_path(inv, app.name).exists() else None
            if journal is not None and journal.phase == "updated":
                docker_engine.docker("image", "rm", "-f", v1, timeout=60, check=False)
                removed.set()
                return
            time.sleep(0.02)

    t = threading.Thread(target=prune_when_updated, daemon=True)
    t.start()
    try:
        state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    finally:
        t.join(60)
        docker_engine.docker("pull", "-q", app_images.ref("1"), timeout=120)  # other tests
    assert removed.is_set(), "the old image was not removed during the gate"
    assert state.name == "RolledBack", state.message
    _run, logs, _arts = _flow_run_record(state)
    assert any("is not on the guest: pulling" in log.message for log in logs)
    app.wait_version("1")
    assert image_of(app) == v1


def test_snapshot_rollback_of_a_compose_app_also_puts_the_old_images_back(
        stack, app_images, upd: UpdLab, prefect_harness):  # noqa: F811
    app, path = stack("u-snap", 703, rollback="snapshot")
    v1 = image_of(app)
    offer(app_images, "u-snap", "2-bad")
    state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert state.name == "RolledBack", state.message
    (row,) = result_rows(state)
    assert row["protection"].startswith("snapshot labkeeper-pre-update-")
    assert [r for r in upd.writes() if r["path"].endswith("/rollback")]
    app.wait_version("1")
    assert image_of(app) == v1
    app.run("up", "-d", "--wait", timeout=120)
    assert image_of(app) == v1


# ------------------------------------------------------------------------------- pull


def test_a_failed_pull_changes_nothing_and_never_rolls_back(stack, app_images,
                                                           prefect_harness):
    app, path = stack("u-pull", 704)
    inv = load(path)
    before = container_id(app)
    compose_file = app.dir / "compose.yaml"
    spec = json.loads(compose_file.read_text())
    spec["services"]["web"]["image"] = app_images.ref("no-such-tag")  # unknown tag
    compose_file.write_text(json.dumps(spec))
    state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert state.is_failed() and state.name == "Failed", (state.name, state.message)
    (row,) = result_rows(state)
    assert row["status"] == "failed" and "pull failed" in row["detail"]
    assert "nothing changed" in row["detail"] and "rolled" not in row["detail"]
    assert container_id(app) == before and app.version() == "1"
    assert not core.journal_path(inv, app.name).exists() and core.read_pin(inv, app.name) \
        is None
    assert is_transient(core.PullFailed("x"))


def test_registry_down_pull_fails_cleanly_and_the_tag_still_names_what_runs(
        upd: UpdLab, compose_app, app_images, docker_engine: LocalDocker,  # noqa: F811
        tmp_path: Path, prefect_harness):
    own = LocalRegistry(tmp_path / "reg").start()
    try:
        ref = f"{own.address}/labapp:stable"
        docker_engine.docker("tag", app_images.ref("1"), ref, timeout=60)
        docker_engine.docker("push", "-q", ref, timeout=120)
        app = compose_app(tag="u-down", version="1")
        compose_file = app.dir / "compose.yaml"
        spec = json.loads(compose_file.read_text())
        spec["services"]["web"]["image"] = ref
        compose_file.write_text(json.dumps(spec))
        started(app, "1")
    finally:
        own.stop()  # the registry is down from here on
    upd.guest("g", 705)
    path = upd.write([app.app_entry("g", gate=GATE)])
    before = container_id(app)
    state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    (row,) = result_rows(state)
    assert row["status"] == "failed" and "pull failed" in row["detail"], row
    assert "nothing changed" in row["detail"]
    assert container_id(app) == before and app.version() == "1"
    tagged = docker_engine.docker("image", "inspect", "--format", "{{.Id}}", ref).stdout
    assert tagged.strip() == app_images.ids["1"]


# ------------------------------------------------------------------------------- crash


@pytest.fixture
def killable() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)


def test_worker_killed_between_up_and_gate_next_run_converges(stack, app_images, killable,
                                                             upd: UpdLab,  # noqa: F811
                                                             prefect_harness):
    from prefect.settings import get_current_settings

    app, path = stack("u-crash", 706, gate={**GATE, "initial_delay": 60, "deadline": 90})
    inv = load(path)
    v1 = image_of(app)
    offer(app_images, "u-crash", "2-bad")
    code = ("from flows.update import update_app_flow; "
            f"update_app_flow(apps=[{app.name!r}], lab={str(path)!r})")
    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url),
           "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    killable.append(child)
    deadline = time.monotonic() + 120
    phase = ""
    while time.monotonic() < deadline and child.poll() is None:
        if core.journal_path(inv, app.name).exists():
            journal = core.read_journal(inv, app.name)
            phase = journal.phase if journal else ""
            if phase == "updated":
                break
        time.sleep(0.05)
    assert phase == "updated" and child.poll() is None, "the run never reached its gate"
    os.killpg(child.pid, signal.SIGKILL)  # the worker dies during the gate's delay
    child.wait(10)
    assert image_of(app) == app_images.ids["2-bad"]

    upd.tuning["update_lock_timeout"] = 0
    upd.write([app.app_entry("g", gate=GATE)])  # no minute-long delay for the proofs
    state = update_app_flow(apps=[app.name], lab=str(path), return_state=True)
    assert state.name == "RolledBack", (state.name, state.message)
    (row,) = result_rows(state)
    assert "died after 'updated'" in row["detail"]
    app.wait_version("1")
    assert image_of(app) == v1 and not core.journal_path(inv, app.name).exists()
    assert core.read_pin(inv, app.name) is not None
