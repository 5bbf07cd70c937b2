"""Pure parts of the restic, PostgreSQL and S3 adapters: argv builders and parsers."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from labkeeper import b2, postgres, restic
from labkeeper.errors import CommandError, ConfigError

REPO = restic.Repo(url="s3:https://s3.example/bucket/r", password=SecretStr("repo-pass-123"),
                   aws_access_key_id=SecretStr("KEYID123"),
                   aws_secret_access_key=SecretStr("app-key-secret"))


def test_restic_secrets_go_to_env_and_never_to_argv():
    argv = restic.snapshots_argv(REPO, tags=("db:immich",))
    joined = " ".join(argv)
    for secret in ("repo-pass-123", "KEYID123", "app-key-secret"):
        assert secret not in joined
    env = REPO.env()
    assert env["RESTIC_PASSWORD"] == "repo-pass-123"
    assert env["AWS_SECRET_ACCESS_KEY"] == "app-key-secret"
    assert argv[-2:] == ("--tag", "db:immich")


def test_restic_init_asks_for_repository_v2_for_compression():
    assert restic.init_argv(REPO)[-2:] == ("--repository-version", "2")


def test_restic_exit_code_table_knows_the_scripting_codes():
    t = restic.EXIT_CODES
    assert t.classify(3).outcome == "warning"
    assert t.classify(10).meaning == "repository does not exist"
    assert t.classify(11).outcome == "transient"
    assert t.classify(12).meaning == "wrong password"
    assert t.classify(42).outcome == "permanent" and "unknown" in t.classify(42).meaning


@pytest.mark.parametrize(("stderr", "meaning", "transient"), [
    ("Fatal: wrong password or no key found", "wrong password", False),
    ("Fatal: unable to open config file: Stat: The specified key does not exist.\n"
     "Is there a repository at the following location?", "repository does not exist", False),
    ("unable to create lock in backend: repository is already locked by PID 7",
     "failed to lock repository", True),
    ("Fatal: something else entirely", "fatal error", False),
])
def test_restic_014_exit_1_is_refined_from_stderr(stderr, meaning, transient):
    err = CommandError("x", argv=("restic",), returncode=1, stderr_tail=stderr,
                       meaning="fatal error")
    refined = restic.classify_failure(err)
    assert refined.meaning == meaning and refined.transient is transient


def test_restic_snapshots_json_is_parsed_tolerantly():
    out = ('[{"time":"2026-11-20T02:00:01.5+00:00","tree":"ab","paths":["/immich.sql"],'
           '"hostname":"labkeeper","tags":["db:immich"],"id":"f00d","short_id":"f00d",'
           '"program_version":"restic 0.17.3","summary":{"files_new":1}}]')
    snaps = restic.parse_snapshots(out)
    assert snaps[0].tags == ["db:immich"] and snaps[0].time.year == 2026
    assert restic.parse_snapshots("null") == []


def test_restic_version_is_parsed():
    assert restic.parse_version("restic 0.14.0 compiled with go1.19.8 on linux/amd64") == "0.14.0"
    with pytest.raises(ValueError):
        restic.parse_version("bash: restic: not found")


def test_psql_password_goes_to_env_only():
    conn = postgres.Conn(host="db1", port=5432, dbname="app", user="u",
                         password=SecretStr("pg-secret-pw"))
    assert "pg-secret-pw" not in " ".join(postgres.psql_argv(conn))
    assert conn.env()["PGPASSWORD"] == "pg-secret-pw"


def test_psql_csv_output_drops_header_and_keeps_commas_inside_values():
    assert postgres.parse_csv('a,b\n1,"x,y"\n') == [["1", "x,y"]]
    assert postgres.parse_csv("") == []


@pytest.mark.parametrize("endpoint", ["https://s3.us-west-004.backblazeb2.com",
                                      "http://127.0.0.1:9000", "http://localhost:9000"])
def test_s3_endpoint_accepts_https_and_loopback_http(endpoint):
    b2.check_endpoint(endpoint)


@pytest.mark.parametrize("endpoint", ["http://s3.example.com", "http://10.0.0.5:9000",
                                      "ftp://x"])
def test_s3_endpoint_refuses_plain_http_off_loopback(endpoint):
    with pytest.raises(ConfigError, match=r"s3\.endpoint"):
        b2.check_endpoint(endpoint)
