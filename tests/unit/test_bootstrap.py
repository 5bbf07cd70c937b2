"""Pure parts of bootstrap: templating, package checks, step building, compose argv."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from labkeeper import bootstrap as bs
from labkeeper.errors import ConfigError
from labkeeper.inventory import parse_inventory


def test_render_fills_known_placeholders_and_rejects_unknown_ones():
    ctx = {"guest.name": "web", "lab.name": "home"}
    assert bs.render("{{ guest.name }}.{{lab.name}}", ctx) == ("web.home", False)
    text, secret = bs.render("pw={{ secret:env:PW }}", ctx, resolve_secret=lambda r: "xyz1")
    assert (text, secret) == ("pw=xyz1", True)
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) guest.nme"):
        bs.render("{{ guest.nme }}", ctx)


def test_dpkg_query_output_gives_the_missing_packages():
    out = "coreutils\tii \nnginx\tun \nlibc6:amd64\tii \n"
    installed = bs.parse_dpkg_query(out)
    assert installed == {"coreutils", "libc6:amd64"}
    assert bs.missing_packages(["coreutils", "nginx=1.22-1", "libc6"], installed) == [
        "nginx=1.22-1"]
    assert bs.packages_check_argv(["nginx=1.2"])[-1] == "nginx"
    assert bs.install_argvs(["nginx"])[1][-1] == "nginx"


def _inv(tmp: Path, git_url: str = "https://git.example/app.git") -> object:
    data = {
        "version": 1, "lab": {"name": "unit"},
        "proxmox": {"host": "127.0.0.1", "token_id": "a@pve!b", "token_secret": "env:PVE",
                    "nodes": [{"name": "pve1"}],
                    "storages": [{"name": "local-lvm", "type": "lvmthin",
                                  "content": ["images", "rootdir"]}]},
        "ssh": {"key": "env:KEY"},
        "guests": [{"name": "app", "vmid": 200, "type": "qemu", "node": "pve1",
                    "template": "9000", "resources": {"storage": "local-lvm"},
                    "ssh": {"address": "10.0.0.5"}, "roles": ["app"]}],
        "roles": {"app": {
            "packages": ["git"],
            "files": [{"path": "/etc/app.conf", "content": "name={{ guest.name }}"}],
            "commands": [["systemctl", "restart", "app"]],
            "compose": {"dir": "/opt/app", "git_url": git_url,
                        "git_ref": "main", "environment": {"MODE": "prod"},
                        "secrets": {"TOKEN": "env:APP_TOKEN"}}}},
    }
    return parse_inventory(yaml.safe_dump(data))


def test_role_steps_are_built_in_order_with_env_0600_and_secrets_by_reference(tmp_path):
    inv = _inv(tmp_path)
    guest = inv.guest("app")  # type: ignore[attr-defined]
    steps = bs.role_steps(inv, guest, "app", base_dir=tmp_path, state_dir="/srv/lk",  # type: ignore[arg-type]
                          resolve_secret=lambda ref: f"<{ref}>")
    assert [s.kind for s in steps] == ["packages", "file", "dir", "compose-git", "file",
                                       "commands", "compose-deploy"]
    conf, env = steps[1], steps[4]
    assert conf.content == b"name=app" and conf.mode == 0o644
    assert env.path == "/opt/app/.env" and env.mode == 0o600 and env.secret
    assert env.content == b"MODE=prod\nTOKEN=<env:APP_TOKEN>\n"
    assert "TOKEN" not in repr(env) and b"<env" not in repr(env).encode()
    assert steps[5].marker == "/srv/lk/roles/app.sha256"
    deploy = steps[6]
    assert deploy.argvs[0] == ("docker", "compose", "--project-directory", "/opt/app", "-p",
                               "app", "-f", "/opt/app/compose.yaml", "up", "-d",
                               "--remove-orphans", "--wait")


def test_git_argvs_clone_a_ref_and_check_out_what_was_fetched():
    from labkeeper.inventory import ComposeStack

    a = bs.git_argvs(ComposeStack(dir=Path("/opt/x"), git_url="https://g.example/x.git",
                                  git_ref="v2"))
    assert a["clone"] == ("git", "clone", "--quiet", "--branch", "v2", "--",
                          "https://g.example/x.git", "/opt/x")
    assert a["checkout"][-1] == "FETCH_HEAD"


def test_git_argvs_end_options_before_every_url_and_ref():
    from labkeeper.inventory import ComposeStack

    a = bs.git_argvs(ComposeStack(dir=Path("/opt/x"), git_url="-uevil@h.example:x",
                                  git_ref="main"))
    assert a["remote"] == ("git", "ls-remote", "--", "-uevil@h.example:x", "main")
    assert a["clone"][-3:] == ("--", "-uevil@h.example:x", "/opt/x")
    assert a["fetch"][-3:] == ("--", "origin", "main")


@pytest.mark.parametrize("ref", ["--upload-pack=touch /tmp/pwned", "-x", "a..b", "+main",
                                 "main:evil", "HEAD@{1}", "v1.lock", "dir/", "a b"])
def test_a_git_ref_that_could_read_as_an_option_or_refspec_is_refused(ref):
    from pydantic import ValidationError

    from labkeeper.inventory import ComposeStack

    with pytest.raises(ValidationError, match="git_ref"):
        ComposeStack(dir=Path("/opt/x"), git_url="https://g.example/x.git", git_ref=ref)
    stack = ComposeStack.model_construct(dir=Path("/opt/x"), git_url="https://g.example/x.git",
                                         git_ref=ref)  # skips the model's validation
    with pytest.raises(ConfigError, match="git_ref"):
        bs.git_argvs(stack)


@pytest.mark.parametrize("ref", ["main", "v2.1.0", "release/2024-05", "3f2a9c1", "feature_x"])
def test_ordinary_branches_tags_and_commits_are_accepted_as_git_ref(ref):
    from labkeeper.inventory import ComposeStack

    stack = ComposeStack(dir=Path("/opt/x"), git_url="https://g.example/x.git", git_ref=ref)
    assert bs.git_argvs(stack)["fetch"][-1] == ref


def test_credentials_in_a_git_url_stay_out_of_the_step_name(tmp_path):
    inv = _inv(tmp_path, "https://bot:glpat-secret-1234@git.example/app.git")
    steps = bs.role_steps(inv, inv.guest("app"), "app", base_dir=tmp_path,  # type: ignore[attr-defined]
                          resolve_secret=lambda ref: f"<{ref}>")
    git = next(s for s in steps if s.kind == "compose-git")
    assert "glpat-secret-1234" not in git.name and "bot:********@" in git.name
    assert git.url == "https://bot:glpat-secret-1234@git.example/app.git"  # git gets it


def test_docker_problems_are_named_clearly():
    def res(rc: int, err: str) -> SimpleNamespace:
        return SimpleNamespace(returncode=rc, stdout="", stderr=err)

    assert bs.docker_problem(res(0, ""), "h") is None
    assert bs.docker_problem(res(127, "sh: docker: not found"), "h") == "docker not found on h"
    assert bs.docker_problem(res(1, "docker: unknown command: docker compose"), "h") == (
        "docker compose not found on h (docker is there, its compose plugin is not)")
