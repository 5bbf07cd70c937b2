"""The command line: validate prints every problem and exits non-zero."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from labkeeper.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_validate_accepts_the_example_inventory():
    res = CliRunner().invoke(app, ["validate", str(ROOT / "lab.example.yaml")])
    assert res.exit_code == 0, res.output
    assert "ok" in res.output


def test_validate_prints_all_problems_with_file_line_and_field_and_exits_1(tmp_path: Path):
    bad = tmp_path / "lab.yaml"
    bad.write_text("version: 1\nlab: {name: x}\nrepositories:\n  - name: r\n"
                   "    url: /srv/restic\n    password: env:RP\n    retension: {}\n"
                   "databases:\n  - name: d\n    host: 10.0.0.3\n    dbname: d\n"
                   "    user: u\n    repository: nope\n    port: 99999\n")
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1
    out = res.output
    assert f"{bad}:7 repositories[0].retension: unknown key" in out
    assert "did you mean 'retention'" in out
    assert f"{bad}:14 databases[0].port" in out
    assert f"{bad}:13 databases[0].repository" in out


def test_validate_reports_yaml_syntax_errors_with_a_line(tmp_path: Path):
    bad = tmp_path / "lab.yaml"
    bad.write_text("version: 1\nlab:\n  name: [unclosed\n")
    res = CliRunner().invoke(app, ["validate", str(bad)])
    assert res.exit_code == 1
    assert f"{bad}:" in res.output
