"""Prometheus metrics: every job records its latest figures; a textfile-collector file
and an optional ``/metrics`` listener expose them.

Jobs run in separate processes (Prefect workers), so the figures live in a small JSON
store under ``settings.state_dir`` (written atomically, under a lock) and the textfile
is re-rendered from it after every update. The store only ever holds the *latest*
value per series: gauges, as node_exporter's textfile collector expects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

# name -> help. Names follow Prometheus conventions (unit suffixes, _timestamp_seconds).
METRICS: dict[str, str] = {
    "labkeeper_backup_last_success_timestamp_seconds":
        "Unix time of the last verified backup of a series.",
    "labkeeper_backup_last_run_timestamp_seconds": "Unix time of the last backup attempt.",
    "labkeeper_backup_success": "1 if the last backup attempt of a series succeeded, else 0.",
    "labkeeper_backup_duration_seconds": "Wall time of the last successful backup.",
    "labkeeper_backup_dumped_bytes": "Bytes read from the source by the last backup.",
    "labkeeper_backup_added_bytes": "Bytes the last backup added to the repository.",
    "labkeeper_vzdump_success": "1 if the last vzdump of a guest succeeded, else 0.",
    "labkeeper_vzdump_last_success_timestamp_seconds": "Unix time of the last good vzdump.",
    "labkeeper_vzdump_archive_bytes": "Size of the newest vzdump archive of a guest.",
    "labkeeper_drill_success": "1 if the last restore drill of a target passed, else 0.",
    "labkeeper_drill_rto_seconds": "Measured recovery time of the last drill.",
    "labkeeper_drill_rpo_seconds": "Age of the restored backup at the last drill.",
    "labkeeper_drill_last_run_timestamp_seconds": "Unix time of the last drill.",
    "labkeeper_update_success": "1 if the last update of an app succeeded without rollback.",
    "labkeeper_update_rolled_back": "1 if the last update of an app was rolled back.",
    "labkeeper_update_blocked": "1 if the last update of an app could not get its guest's "
                                "lock (another update ran).",
    "labkeeper_update_held": "1 if the last update of an app was held: the registry offered "
                             "only images rolled back before.",
    "labkeeper_update_stale": "1 if an unfinished update of an app is too old to finish "
                              "automatically and waits for a person.",
    "labkeeper_update_last_run_timestamp_seconds": "Unix time of the last update attempt.",
    "labkeeper_doctor_check_success": "1 if the last doctor check of a target passed.",
}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


class Store:
    """The latest value per (metric, labels), in ``<state_dir>/metrics.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "metrics.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {k: float(v) for k, v in data.items()}

    def update(self, samples: list[Sample], *, locked: bool = False) -> None:
        """Set the samples' values (``locked``: the caller holds :meth:`_locked`)."""
        for s in samples:
            if s.name not in METRICS:
                raise ValueError(f"unknown metric {s.name!r} (add it to METRICS with help)")
        with contextlib.nullcontext() if locked else self._locked():
            data = self._read()
            for s in samples:
                data[_key(s.name, s.labels)] = float(s.value)
            _atomic_write(self.path, json.dumps(data, indent=1, sort_keys=True))

    def samples(self) -> list[Sample]:
        out = []
        for key, value in sorted(self._read().items()):
            name, labels = _unkey(key)
            out.append(Sample(name, labels, value))
        return out


def _key(name: str, labels: Mapping[str, str]) -> str:
    return json.dumps([name, sorted((str(k), str(v)) for k, v in labels.items())])


def _unkey(key: str) -> tuple[str, dict[str, str]]:
    name, pairs = json.loads(key)
    return name, dict(pairs)


class _StoreCollector(Collector):
    def __init__(self, store: Store) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[tuple[str, tuple[str, ...]], GaugeMetricFamily] = {}
        for s in self.store.samples():
            label_names = tuple(sorted(s.labels))
            fam = families.get((s.name, label_names))
            if fam is None:
                fam = GaugeMetricFamily(s.name, METRICS[s.name], labels=list(label_names))
                families[(s.name, label_names)] = fam
            fam.add_metric([s.labels[k] for k in label_names], s.value)
        by_name: dict[str, GaugeMetricFamily] = {}
        for (name, _), fam in families.items():
            # One family per name: merge label sets if a name was used with several.
            if name in by_name:
                by_name[name].samples.extend(fam.samples)
            else:
                by_name[name] = fam
        yield from by_name.values()


def render(store: Store) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreCollector(store))
    return generate_latest(registry).decode()


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record(state_dir: Path, textfile: Path | None, samples: list[Sample]) -> None:
    """Update the store and re-render the textfile-collector file (if configured)."""
    store = Store(state_dir)
    with store._locked():  # the textfile is rendered and replaced under the same lock,
        store.update(samples, locked=True)  # so a slower writer never puts back stale text
        if textfile is not None:
            _atomic_write(textfile, render(store))


def serve(state_dir: Path, address: str, port: int) -> object:
    """Serve ``/metrics`` from the store in a background thread; returns the server."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StoreCollector(Store(state_dir)))
    server, _thread = start_http_server(port, addr=address, registry=registry)
    return server
