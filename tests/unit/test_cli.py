"""The command line: validate prints every problem and exits non-zero."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

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


def test_serve_schedules_lists_each_deployment_with_the_source_of_its_schedule():
    import json

    example = str(ROOT / "lab.example.yaml")
    res = CliRunner().invoke(app, ["serve", "--schedules", "--json", "--lab", example])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert {"deployment": "weekly-vzdump", "cron": "15 1 * * *", "timezone": "Europe/Berlin",
            "parameters": {"job": "daily-critical"},
            "source": "inventory: vzdump_jobs[daily-critical].schedule"} in rows
    assert [r["source"] for r in rows if r["deployment"] == "runbook"] == ["on demand"]
    table = CliRunner().invoke(app, ["serve", "--schedules", "--lab", example])
    assert table.exit_code == 0
    assert "vzdump_jobs[" in table.output  # brackets shown, not taken for rich markup


def test_serve_refuses_a_broken_inventory_before_serving_anything(tmp_path: Path):
    bad = tmp_path / "lab.yaml"
    bad.write_text("version: 1\nlab: {name: x}\nrepositoriez: []\n")
    res = CliRunner().invoke(app, ["serve", "--lab", str(bad)])
    assert res.exit_code == 2
    assert "repositoriez" in res.output


def test_metrics_serve_without_a_port_says_where_to_give_one(tmp_path: Path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"version: 1\nlab: {{name: x}}\nsettings: {{state_dir: {tmp_path}}}\n")
    res = CliRunner().invoke(app, ["metrics", "serve", "--lab", str(lab)])
    assert res.exit_code == 2
    assert "--port or settings.metrics.listen_port" in res.output


def test_metrics_show_prints_the_store_as_prometheus_text(tmp_path: Path):
    from prometheus_client.parser import text_string_to_metric_families

    from labkeeper import metrics

    metrics.record(tmp_path, None, [metrics.Sample("labkeeper_update_rolled_back",
                                                   {"app": "immich"}, 1)])
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"version: 1\nlab: {{name: x}}\nsettings: {{state_dir: {tmp_path}}}\n")
    res = CliRunner().invoke(app, ["metrics", "show", "--lab", str(lab)])
    assert res.exit_code == 0, res.output
    (fam,) = text_string_to_metric_families(res.stdout)
    assert fam.name == "labkeeper_update_rolled_back" and fam.samples[0].value == 1
