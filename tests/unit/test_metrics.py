"""Metrics: the textfile parses with prometheus_client's parser; latest value wins."""

from __future__ import annotations

import threading
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from labkeeper import metrics
from labkeeper.metrics import Sample


def _families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_textfile_is_valid_exposition_with_help_type_and_labels(tmp_path: Path):
    tf = tmp_path / "textfile" / "labkeeper.prom"
    metrics.record(tmp_path, tf, [
        Sample("labkeeper_backup_last_success_timestamp_seconds",
               {"series": "db:pg1/appdb", "kind": "pg_dump"}, 1_790_000_000),
        Sample("labkeeper_backup_added_bytes", {"series": "db:pg1/appdb", "kind": "pg_dump"},
               3_500_000),
        Sample("labkeeper_vzdump_success", {"vmid": "110", "node": "pve1"}, 1),
    ])
    fams = _families(tf.read_text())
    ts = fams["labkeeper_backup_last_success_timestamp_seconds"]
    assert ts.type == "gauge" and ts.documentation
    assert ts.samples[0].labels == {"series": "db:pg1/appdb", "kind": "pg_dump"}
    assert ts.samples[0].value == 1_790_000_000
    assert fams["labkeeper_vzdump_success"].samples[0].labels["vmid"] == "110"


def test_later_records_replace_the_same_series_and_keep_others(tmp_path: Path):
    tf = tmp_path / "m.prom"
    lab = {"series": "db:pg1/appdb", "kind": "pg_dump"}
    metrics.record(tmp_path, tf, [Sample("labkeeper_backup_success", lab, 1)])
    metrics.record(tmp_path, tf, [Sample("labkeeper_backup_success",
                                         {"series": "db:pg1/photos", "kind": "pg_dump"}, 1)])
    metrics.record(tmp_path, tf, [Sample("labkeeper_backup_success", lab, 0)])
    samples = _families(tf.read_text())["labkeeper_backup_success"].samples
    values = {s.labels["series"]: s.value for s in samples}
    assert values == {"db:pg1/appdb": 0.0, "db:pg1/photos": 1.0}


def test_unknown_metric_names_are_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.record(tmp_path, None, [Sample("labkeeper_made_up", {}, 1)])


def test_concurrent_writers_lose_no_series(tmp_path: Path):
    tf = tmp_path / "m.prom"

    def write(i: int) -> None:
        metrics.record(tmp_path, tf, [Sample("labkeeper_drill_success", {"target": f"t{i}"}, 1)])

    threads = [threading.Thread(target=write, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    samples = _families(tf.read_text())["labkeeper_drill_success"].samples
    assert len(samples) == 16


def test_metrics_endpoint_serves_the_store(tmp_path: Path):
    from labkeeper.locallab.ports import free_port

    metrics.record(tmp_path, None, [Sample("labkeeper_drill_rto_seconds", {"target": "appdb"}, 42)])
    port = free_port()
    server = metrics.serve(tmp_path, "127.0.0.1", port)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    assert _families(text)["labkeeper_drill_rto_seconds"].samples[0].value == 42


def test_metric_names_follow_prometheus_conventions():
    import re

    for name, help_text in metrics.METRICS.items():
        assert re.fullmatch(r"labkeeper_[a-z][a-z0-9_]*", name), name
        assert help_text.strip(), name
        assert not name.endswith("_total"), f"{name}: gauges carry no _total suffix"
        if "timestamp" in name:
            assert name.endswith("_timestamp_seconds"), name
        if "duration" in name or name.endswith(("_rto_seconds", "_rpo_seconds")):
            assert name.endswith("_seconds"), name
        if "bytes" in name:
            assert name.endswith("_bytes"), name


def test_every_family_is_a_gauge_with_its_help_in_the_exposition(tmp_path: Path):
    samples = [Sample(name, {"target": "x"}, 1) for name in metrics.METRICS]
    metrics.record(tmp_path, None, samples)
    fams = _families(metrics.render(metrics.Store(tmp_path)))
    assert set(fams) == set(metrics.METRICS)
    assert {f.type for f in fams.values()} == {"gauge"}
    assert all(fams[n].documentation == h for n, h in metrics.METRICS.items())
