"""The shipped Prometheus rules and Grafana dashboard, checked with promtool and against
the metrics labkeeper really exports (rendered from a metrics store)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from labkeeper import metrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "prometheus" / "labkeeper.rules.yml"
RULE_TESTS = ROOT / "tests" / "monitoring" / "labkeeper.test.yml"
DASHBOARD = ROOT / "monitoring" / "grafana" / "labkeeper.json"
PROMTOOL = "/usr/bin/promtool"
NAME = re.compile(r"\blabkeeper_[a-z_]+\b")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True,
                          timeout=120, check=False)


def exported(tmp_path: Path) -> str:
    """labkeeper's exposition text with one sample of every metric it knows."""
    store = metrics.Store(tmp_path)
    store.update([metrics.Sample(name, {"series": "db:pg/app", "kind": "pg_dump"}, 1.0)
                  for name in metrics.METRICS])
    return metrics.render(store)


def exported_names(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def rule_exprs() -> list[str]:
    doc = yaml.safe_load(RULES.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_the_alerting_rules_pass_promtool_check():
    res = promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_alerting_rules_pass_their_promtool_unit_tests():
    res = promtool("test", "rules", str(RULE_TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_labkeepers_exposition_passes_promtool_check_metrics(tmp_path: Path):
    res = promtool("check", "metrics", stdin=exported(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_metric_the_rules_and_the_dashboard_name_is_one_labkeeper_exports(tmp_path: Path):
    names = exported_names(exported(tmp_path))
    assert names == set(metrics.METRICS)
    used_rules = {n for e in rule_exprs() for n in NAME.findall(e)}
    used_dash = {n for e in dashboard_exprs() for n in NAME.findall(e)}
    assert used_rules and used_dash
    assert used_rules <= names, used_rules - names
    assert used_dash <= names, used_dash - names


def test_the_rule_tests_feed_only_metrics_labkeeper_exports(tmp_path: Path):
    names = exported_names(exported(tmp_path))
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fed = {NAME.match(s["series"]).group(0)
           for t in doc["tests"] for s in t["input_series"]}
    assert fed <= names, fed - names
