"""Pure parts of the local Docker lab and of ``docker_host`` (no engine started)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from pydantic import ValidationError

from labkeeper import compose
from labkeeper.inventory import AppCompose, ComposeStack
from labkeeper.locallab.docker import LocalDocker, daemon_json, dockerd_argv, registry_config
from labkeeper.locallab.images import (
    _push_digest,
    base_dockerfile,
    dockerfile,
    write_busybox_tar,
    www_files,
)


def test_dockerd_argv_keeps_the_engine_private_and_off_the_network() -> None:
    argv = dockerd_argv(data_root=Path("/w/data"), run_dir=Path("/tmp/r"),
                        sock=Path("/tmp/r/docker.sock"))
    assert argv[0] == "/usr/sbin/dockerd"
    for flag in ("--bridge=none", "--iptables=false", "--ip-masq=false"):
        assert flag in argv
    assert argv[argv.index("--data-root") + 1] == "/w/data"
    assert argv[argv.index("--exec-root") + 1] == "/tmp/r/exec"
    assert argv[argv.index("-H") + 1] == "unix:///tmp/r/docker.sock"
    assert argv[argv.index("--config-file") + 1] == "/tmp/r/daemon.json"


def test_daemon_config_keeps_the_engine_identity_key_out_of_etc_docker() -> None:
    cfg = json.loads(daemon_json(Path("/tmp/r")))
    assert cfg == {"deprecated-key-path": "/tmp/r/key.json"}


def test_long_workdir_moves_the_engine_sockets_to_a_short_dir(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 90)
    engine = LocalDocker(deep)
    try:
        assert len(str(engine.sock)) < 100
        assert not str(engine.run_dir).startswith(str(deep))
        assert engine.data_root == deep / "data"
        assert engine.env == {"DOCKER_HOST": f"unix://{engine.sock}"}
    finally:
        engine.run_dir.rmdir()


def test_registry_config_listens_on_loopback_only_with_storage_in_workdir() -> None:
    cfg = json.loads(registry_config(storage=Path("/w/storage"), port=5123))
    assert cfg["http"]["addr"] == "127.0.0.1:5123"
    assert cfg["storage"]["filesystem"]["rootdirectory"] == "/w/storage"


def test_bad_version_has_no_health_page_and_its_healthcheck_probes_it() -> None:
    assert "health" not in www_files("2-bad")
    assert "HEALTH_PATH=health" in dockerfile("2-bad")
    assert '/$HEALTH_PATH"' in base_dockerfile()
    assert www_files("2")["health"] == "ok\n"
    assert www_files("2")["version"] == "2\n"


def test_badhttp_version_passes_its_healthcheck_but_serves_no_health_page() -> None:
    assert "health" not in www_files("2-badhttp")
    assert "HEALTH_PATH=alive" in dockerfile("2-badhttp")
    assert "alive" in www_files("2-badhttp")


def test_push_digest_is_read_from_docker_push_output() -> None:
    digest = "sha256:" + "ab" * 32
    out = f"The push refers to repository [127.0.0.1:5000/labapp]\n1: digest: {digest} size: 735\n"
    assert _push_digest(out) == digest
    assert _push_digest("nothing here") is None


def test_busybox_tar_has_busybox_its_applet_links_and_a_sticky_tmp(tmp_path: Path) -> None:
    fake = tmp_path / "busybox"
    fake.write_text("#!/bin/sh\necho sh\necho httpd\necho wget\necho busybox\n")
    fake.chmod(0o755)
    tar_path = write_busybox_tar(tmp_path / "rootfs.tar", fake)
    with tarfile.open(tar_path) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/busybox"].isfile()
    assert members["bin/httpd"].issym() and members["bin/httpd"].linkname == "busybox"
    assert "bin/busybox" in members and "bin/sh" in members
    assert members["tmp"].mode == 0o1777
    assert not list(tmp_path.glob(".busybox-*"))  # the temp file was renamed into place


@pytest.mark.parametrize("host", ["unix:///run/user/1000/docker.sock", "tcp://10.0.0.5:2375",
                                  "ssh://admin@nas.lan", "ssh://nas.lan:2222"])
def test_docker_host_accepts_unix_tcp_and_ssh_addresses(host: str) -> None:
    assert AppCompose(dir=Path("/srv/app"), docker_host=host).docker_host == host
    assert ComposeStack(dir=Path("/srv/app"), docker_host=host).docker_host == host


@pytest.mark.parametrize("host", ["/run/docker.sock", "unix://relative.sock",
                                  "unix:///run/../etc/x", "tcp://10.0.0.5", "http://h:1",
                                  "tcp://h:notaport"])
def test_docker_host_refuses_what_docker_cannot_use(host: str) -> None:
    with pytest.raises(ValidationError, match="docker_host"):
        AppCompose(dir=Path("/srv/app"), docker_host=host)


def test_compose_argv_names_the_engine_when_docker_host_is_set() -> None:
    cfg = AppCompose(dir=Path("/srv/app"), docker_host="unix:///run/user/1000/docker.sock")
    assert compose.pull_argv(cfg)[:4] == ("docker", "--host",
                                           "unix:///run/user/1000/docker.sock", "compose")
    plain = AppCompose(dir=Path("/srv/app"))
    assert compose.pull_argv(plain)[:2] == ("docker", "compose")


def test_bootstrap_compose_argvs_name_the_engine_and_wait_for_health() -> None:
    from labkeeper import bootstrap as bs

    stack = ComposeStack(dir=Path("/srv/app"), project="app",
                         docker_host="unix:///run/user/1000/docker.sock")
    up = bs.compose_up_argv(stack)
    assert up[:4] == ("docker", "--host", "unix:///run/user/1000/docker.sock", "compose")
    assert up[-4:] == ("up", "-d", "--remove-orphans", "--wait")
    assert bs.compose_ps_argv(stack)[1:3] == ("--host", "unix:///run/user/1000/docker.sock")
    assert bs.engine_argv(None) == ("docker", "version", "--format", "{{.Server.Version}}")


def test_a_docker_daemon_that_does_not_answer_is_named_as_such() -> None:
    from types import SimpleNamespace

    from labkeeper import bootstrap as bs

    res = SimpleNamespace(returncode=1, stdout="", stderr="Cannot connect to the Docker daemon "
                          "at unix:///var/run/docker.sock. Is the docker daemon running?")
    problem = bs.docker_problem(res, "web")
    assert problem is not None and problem.startswith("the Docker engine on web does not answer")


def test_a_file_url_on_the_guest_is_a_git_url_but_a_file_url_with_a_host_is_not() -> None:
    assert ComposeStack(dir=Path("/srv/app"), git_url="file:///srv/git/app.git").git_url
    with pytest.raises(ValidationError, match="git URL"):
        ComposeStack(dir=Path("/srv/app"), git_url="file://nas/srv/git/app.git")
    with pytest.raises(ValidationError, match="git URL"):
        ComposeStack(dir=Path("/srv/app"), git_url="file:relative/app.git")
