"""A path-backup host gets credentials of its own (``host_credentials``): a second
restic key of the repository (``restic key add``) and bucket keys of its own, never
the repository's password or bucket keys. Real local lab: the sshd (root on this
machine) is the host, moto's S3 holds a repository made for this module."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import yaml

from labkeeper import path_backup, process, restic
from labkeeper.inventory import load_inventory

pytestmark = pytest.mark.integration


def _write_secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def setup(lab, tmp_path_factory):
    base = tmp_path_factory.mktemp("hostkeys")
    inv = yaml.safe_load(lab.inventory_path.read_text())
    main = inv["repositories"][0]
    repo_url = main["url"].rsplit("/", 1)[0] + f"/hostkeys-{uuid.uuid4().hex[:8]}"
    inv["repositories"].append({**main, "name": "hostkeys-repo", "url": repo_url})
    host_pw = _write_secret(base / "host-key", f"host-only-key-{uuid.uuid4().hex}")
    host_id = _write_secret(base / "host-s3-id", "HOSTKEYID0000001")
    host_secret = _write_secret(base / "host-s3-secret", f"host-s3-secret-{uuid.uuid4().hex}")
    src = base / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello\n")
    # restic on the "host" is a wrapper that records the environment it was given
    seen = base / "environ.log"
    wrapper = base / "restic-wrapper"
    wrapper.write_text(f"#!/bin/sh\ncat /proc/$$/environ >> {seen}\nprintf '\\n' >> {seen}\n"
                       f"exec {restic.default_binary()} \"$@\"\n")
    wrapper.chmod(0o755)
    inv["path_backups"] = [{
        "name": "keyed", "host": "labhost", "paths": [str(src)], "repository": "hostkeys-repo",
        "restic_binary": str(wrapper), "progress_interval": 1,
        "host_credentials": {"password": f"file:{host_pw}",
                             "s3": {"access_key_id": f"file:{host_id}",
                                    "secret_access_key": f"file:{host_secret}"}}}]
    path = base / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    loaded = load_inventory(path)
    repo = path_backup.open_repo(loaded, loaded.path_backup("keyed"))
    restic.init(repo)
    new_pw = base / "new-password"
    new_pw.write_text(host_pw.read_text())
    process.run((*repo.base_argv(), "key", "add", "--new-password-file", str(new_pw)),
                timeout=120, env=repo.env())
    return {"path": path, "seen": seen, "repo": repo,
            "host_pw": host_pw.read_text().strip(), "host_secret": host_secret.read_text().strip(),
            "repo_pw": repo.password.get_secret_value(),
            "repo_secret": (repo.aws_secret_access_key.get_secret_value()
                            if repo.aws_secret_access_key else None)}


def _environs(seen: Path) -> list[dict[str, str]]:
    out = []
    for block in seen.read_bytes().split(b"\n"):
        if block.strip(b"\0"):
            pairs = [e.split(b"=", 1) for e in block.split(b"\0") if b"=" in e]
            out.append({k.decode(): v.decode() for k, v in pairs})
    return out


def test_a_host_with_credentials_of_its_own_never_receives_the_repositorys(setup):
    inv = load_inventory(setup["path"])
    result = path_backup.backup_path_set(inv, "keyed")
    assert result.status == "ok" and result.snapshot_id
    environs = [e for e in _environs(setup["seen"]) if "RESTIC_PASSWORD" in e]
    assert environs, "restic never ran on the host with a password"
    for env in environs:
        assert env["RESTIC_PASSWORD"] == setup["host_pw"]
        assert env["AWS_SECRET_ACCESS_KEY"] == setup["host_secret"]
        assert env["AWS_ACCESS_KEY_ID"] == "HOSTKEYID0000001"
    raw = setup["seen"].read_bytes()
    assert setup["repo_pw"].encode() not in raw
    if setup["repo_secret"]:
        assert setup["repo_secret"].encode() not in raw
    # the controller, with the repository's own key, sees the host's snapshot
    snaps = restic.find_snapshots(setup["repo"], tags=[path_backup.backup_tag(result.backup_id)],
                                  host=inv.lab.name)
    assert [s.id for s in snaps] == [result.snapshot_id]
