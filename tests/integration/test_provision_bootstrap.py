"""Bootstrap over SSH against the local sshd (root on this machine: every file under a
tmp dir, only harmless commands; the packages step finds coreutils installed)."""

# ruff: noqa: F811 - the `pve` fixture is imported from test_provision and used by name
from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest

from labkeeper import bootstrap as bs
from labkeeper.errors import ServiceError
from labkeeper.locallab.lab import write_secret
from tests.integration.test_provision import Pve, lxc, pve  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


def _roles(tmp: Path, secret_ref: str) -> dict[str, Any]:
    return {
        "base": {
            "packages": ["coreutils"],
            "files": [
                {"path": str(tmp / "etc" / "motd"),
                 "content": "welcome to {{ guest.name }} ({{ guest.vmid }}) in {{ lab.name }}\n",
                 "mode": "0644"},
                {"path": str(tmp / "etc" / "token"), "secret": secret_ref},
                {"path": str(tmp / "etc" / "app.conf"), "source": "templates/app.conf"},
            ],
            "commands": [["touch", str(tmp / "commands-ran")]],
        },
        "stack": {
            "compose": {"dir": str(tmp / "stack"), "source": "stacks/demo",
                        "docker_host": f"unix://{tmp}/no-engine.sock",
                        "environment": {"APP_MODE": "prod"},
                        "secrets": {"APP_SECRET": secret_ref}},
        },
    }


def _setup(pve: Pve, tmp: Path, roles: list[str]) -> tuple[Any, Any, Path]:
    secret = "s3cr3t-" + tmp.name
    write_secret(pve.workdir / "secrets" / "app", secret)
    (pve.workdir / "templates").mkdir()
    (pve.workdir / "templates" / "app.conf").write_text(
        "host={{ guest.address }}\ntoken={{ secret:file:" + str(pve.workdir / "secrets" / "app")
        + " }}\n")
    (pve.workdir / "stacks" / "demo").mkdir(parents=True)
    (pve.workdir / "stacks" / "demo" / "compose.yaml").write_text(
        "services:\n  web:\n    image: nginx\n")
    inv = pve.load([lxc("web", 200, pve, roles=roles)],
                   roles=_roles(tmp, f"file:{pve.workdir / 'secrets' / 'app'}"))
    return inv, inv.guest("web"), pve.workdir


def test_bootstrap_writes_templated_and_secret_files_then_reports_unchanged(pve: Pve):
    tmp = pve.workdir / "guest-root"
    inv, guest, base = _setup(pve, tmp, ["base"])
    state = str(tmp / "state")
    first = bs.run_bootstrap(inv, guest, base_dir=base, state_dir=state)
    assert first.status == "changed", first.detail
    assert "base/packages: unchanged" in first.detail  # coreutils is installed: no apt-get
    motd = (tmp / "etc" / "motd").read_text()
    assert motd == "welcome to web (200) in prov-test\n"
    token = tmp / "etc" / "token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert token.read_text().startswith("s3cr3t-")
    conf = tmp / "etc" / "app.conf"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600  # it uses a secret: a secret file
    assert conf.read_text() == f"host=127.0.0.1\ntoken=s3cr3t-{tmp.name}\n"
    assert "s3cr3t" not in first.detail
    assert (tmp / "commands-ran").exists()
    ran_at = (tmp / "commands-ran").stat().st_mtime_ns

    second = bs.run_bootstrap(inv, guest, base_dir=base, state_dir=state)
    assert second.status == "unchanged", second.detail
    assert (tmp / "commands-ran").stat().st_mtime_ns == ran_at  # commands not rerun

    (tmp / "etc" / "motd").write_text("drifted\n")
    (tmp / "etc" / "motd").chmod(0o600)
    third = bs.run_bootstrap(inv, guest, base_dir=base, state_dir=state)
    assert "base/file " + str(tmp / "etc" / "motd") + ": changed" in third.detail
    assert (tmp / "etc" / "motd").read_text() == motd
    assert stat.S_IMODE((tmp / "etc" / "motd").stat().st_mode) == 0o644


def test_commands_rerun_after_a_crash_before_their_marker(pve: Pve):
    tmp = pve.workdir / "guest-root"
    inv, guest, base = _setup(pve, tmp, ["base"])
    state = tmp / "state"
    assert bs.run_bootstrap(inv, guest, base_dir=base, state_dir=str(state)).status == "changed"
    (state / "roles" / "base.sha256").unlink()  # the crash: commands ran, marker never written
    (tmp / "commands-ran").unlink()
    again = bs.run_bootstrap(inv, guest, base_dir=base, state_dir=str(state))
    assert "base/commands (1): changed" in again.detail
    assert (tmp / "commands-ran").exists()


def test_compose_writes_the_stack_and_env_0600_then_reports_docker_cannot_deploy(pve: Pve):
    # Without docker: "docker not found"; with docker but no engine at docker_host (this
    # machine has docker.io installed, the lab's engine is not started here): "does not answer".
    tmp = pve.workdir / "guest-root"
    inv, guest, base = _setup(pve, tmp, ["stack"])
    with pytest.raises(ServiceError, match=r"(docker( compose)? not found|the Docker engine) "
                                           r"on web \(127\.0\.0\.1\)"):
        bs.run_bootstrap(inv, guest, base_dir=base, state_dir=str(tmp / "state"))
    stack = tmp / "stack"
    assert stat.S_IMODE(stack.stat().st_mode) == 0o750
    assert (stack / "compose.yaml").read_text().startswith("services:")
    env = stack / ".env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert env.read_text() == f"APP_MODE=prod\nAPP_SECRET=s3cr3t-{tmp.name}\n"
    assert not (tmp / "state" / "compose").exists()  # never marked as deployed
