"""Serve every deployment declared in prefect.yaml from one process (Prefect's `serve`).

The single-machine way to run labkeeper: schedules fire and Run buttons work while
this process is up. prefect.yaml stays the one place where deployments, schedules
and default parameters are declared; this module reads it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def declared(path: Path = REPO / "prefect.yaml") -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text())["deployments"])


def _flow_for(entrypoint: str) -> Any:
    file, _, name = entrypoint.partition(":")
    module = file.removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module), name)


def load_deployments(path: Path = REPO / "prefect.yaml") -> list[Any]:
    """RunnerDeployments for every deployment in prefect.yaml (same names, schedules,
    parameters and tags)."""
    from prefect.schedules import Cron

    out = []
    for d in declared(path):
        flow = _flow_for(d["entrypoint"])
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC"))
                     for s in d.get("schedules") or []]
        out.append(flow.to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags") or [],
            parameters=d.get("parameters") or {}, schedules=schedules,
        ))
    return out


def serve_all() -> None:
    from prefect import serve

    serve(*load_deployments())
