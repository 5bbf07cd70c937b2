"""Valid but unsafe inventories: unverified TLS to PostgreSQL and plain HTTP to a
repository are warned about by `labkeeper validate` and `doctor`, never refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app
from labkeeper import doctor
from labkeeper.inventory import parse_inventory
from labkeeper.inventory.advice import is_loopback, plain_http_host, warnings


def _inv_text(*, db: dict | None = None, url: str = "s3:https://s3.example/bkt/r",
              endpoint: str = "https://s3.example") -> str:
    data = {
        "version": 1, "lab": {"name": "t"},
        "repositories": [{"name": "r", "url": url, "password": "env:P",
                          "s3": {"endpoint": endpoint, "bucket": "bkt",
                                 "access_key_id": "env:A", "secret_access_key": "env:S"}}],
        "databases": [{"name": "appdb", "host": "10.0.0.10", "password": "env:PG",
                       **(db or {})}],
    }
    return yaml.safe_dump(data)


def test_the_default_sslmode_to_a_network_database_is_warned_about():
    found = warnings(parse_inventory(_inv_text()))
    assert len(found) == 1
    assert found[0].startswith("database appdb: sslmode prefer to 10.0.0.10 does not verify")
    assert "verify-full" in found[0]


@pytest.mark.parametrize("db", [{"sslmode": "verify-full"}, {"sslmode": "verify-ca"},
                                {"host": "127.0.0.1"},
                                {"host": "::1"}, {"host": "localhost"}])
def test_a_verifying_sslmode_or_a_loopback_database_gets_no_warning(db):
    assert warnings(parse_inventory(_inv_text(db=db))) == []


@pytest.mark.parametrize(("url", "endpoint", "expect"), [
    ("s3:http://minio.lan:9000/bkt/r", "http://minio.lan:9000", "s3:http://minio.lan is plain"),
    ("s3:https://s3.example/bkt/r", "http://s3.example", "s3.endpoint http://s3.example"),
])
def test_plain_http_to_a_remote_s3_is_warned_about(url, endpoint, expect):
    found = warnings(parse_inventory(_inv_text(db={"sslmode": "verify-full"}, url=url,
                                               endpoint=endpoint)))
    assert len(found) == 1 and expect in found[0]


def test_plain_http_to_loopback_is_fine_and_rest_http_elsewhere_is_not():
    assert plain_http_host("s3:http://127.0.0.1:9000/bkt/r") is None
    assert plain_http_host("rest:http://[::1]:8000/") is None
    assert plain_http_host("rest:http://backup.lan:8000/") == "backup.lan"
    assert plain_http_host("rest:https://backup.lan:8000/") is None
    assert is_loopback("127.9.9.9") and not is_loopback("10.0.0.1")


def test_validate_prints_the_warnings_and_still_exits_0(tmp_path: Path):
    path = tmp_path / "lab.yaml"
    path.write_text(_inv_text(url="s3:http://minio.lan:9000/bkt/r",
                              endpoint="http://minio.lan:9000"))
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert f"{path}: warning: database appdb: sslmode prefer" in res.output
    assert f"{path}: warning: repository r: s3:http://minio.lan is plain HTTP" in res.output


def test_doctor_plans_a_config_row_per_warned_target_and_reports_it_as_warn():
    inv = parse_inventory(_inv_text(url="s3:http://minio.lan:9000/bkt/r",
                                    endpoint="http://minio.lan:9000"))
    config = [s for s in doctor.plan_checks(inv) if s.check == "config"]
    assert [s.target for s in config] == ["database appdb", "repository r"]
    row = doctor.run_check(inv, config[0])
    assert row.status == "warn" and "sslmode prefer" in row.detail
