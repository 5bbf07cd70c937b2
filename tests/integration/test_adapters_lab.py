"""restic, PostgreSQL and S3 adapters against the real local lab."""

from __future__ import annotations

import dataclasses

import pytest
from pydantic import SecretStr

from labkeeper import b2, postgres, restic
from labkeeper.errors import CommandError, ServiceError


@pytest.fixture(scope="module")
def conn(lab):
    pw = lab.postgres.password_file.read_text().strip()
    return postgres.Conn(host=lab.postgres.host, port=lab.postgres.port, dbname="appdb",
                         user=lab.postgres.app_user, password=SecretStr(pw))


def test_seeded_database_has_realistic_rows(conn):
    rows = postgres.query(conn, "SELECT count(*) FROM users; ")
    assert rows == [["500"]]
    info = postgres.server_info(conn)
    assert info.version.startswith("15") or info.version[:2].isdigit()
    assert info.database_size > 1_000_000


def test_wrong_database_password_is_a_permanent_error(conn):
    bad = dataclasses.replace(conn, password=SecretStr("definitely-wrong"))
    with pytest.raises(CommandError) as info:
        postgres.query(bad, "SELECT 1;")
    assert "password authentication failed" in info.value.stderr_tail
    assert not info.value.transient


def test_closed_database_port_is_a_transient_error(conn):
    from labkeeper.locallab.ports import free_port

    down = dataclasses.replace(conn, port=free_port(), connect_timeout=2)
    with pytest.raises(CommandError) as info:
        postgres.query(down, "SELECT 1;")
    assert info.value.transient


def test_lab_repository_opens_and_lists_snapshots(lab):
    assert restic.repo_config(lab.repo).version == 2
    assert isinstance(restic.snapshots(lab.repo), list)


def test_wrong_repository_password_is_recognised(lab):
    bad = dataclasses.replace(lab.repo, password=SecretStr("not-the-password"))
    with pytest.raises(CommandError) as info:
        restic.snapshots(bad, timeout=60)
    assert info.value.meaning == "wrong password" and not info.value.transient
    assert "not-the-password" not in str(info.value)


def test_missing_repository_is_recognised(lab):
    missing = dataclasses.replace(lab.repo, url=lab.repo.url + "-nope")
    with pytest.raises(CommandError) as info:
        restic.snapshots(missing, timeout=60)
    assert info.value.meaning == "repository does not exist"


def test_bucket_check_passes_and_missing_bucket_is_permanent(lab):
    target = lab.s3.target()
    assert b2.head_bucket(target) >= 0
    with pytest.raises(ServiceError) as info:
        b2.head_bucket(dataclasses.replace(target, bucket="no-such-bucket"))
    assert info.value.status == 404 and not info.value.transient


def test_unreachable_s3_endpoint_is_transient(lab):
    from labkeeper.locallab.ports import free_port

    target = dataclasses.replace(lab.s3.target(), endpoint=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServiceError) as info:
        b2.head_bucket(target, timeout=2)
    assert info.value.transient
