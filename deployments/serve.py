"""Serve every deployment declared in prefect.yaml from one process (Prefect's `serve`).

The single-machine way to run labkeeper: schedules fire and Run buttons work while
this process is up. prefect.yaml declares the deployments (entrypoints, default
parameters, tags, work pool); this module reads it.

**Which schedule counts.** The inventory says when each backup, update, drill and
check runs (``databases[].schedule``, ``path_backups[].schedule``, ``apps[].schedule``,
``vzdump_jobs[].schedule``, ``repositories[].maintenance_schedule``,
``drills.schedule`` and the per-target drill schedules,
``notifications.missing_backup_schedule``), in the lab's time zone; `labkeeper status`
and the dead-man's check judge "late" against the same fields. So for the deployments
labkeeper ships (:data:`FROM_INVENTORY`) the inventory's schedules replace the ones in
prefect.yaml — one schedule per distinct cron, with parameters selecting the items that
share it. prefect.yaml's own schedules are what ``prefect deploy --all`` installs
before :func:`sync_schedules` replaces them, and what is served when no inventory is
given; deployments you add to prefect.yaml keep their own schedules.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from labkeeper.inventory import Inventory

REPO = Path(__file__).resolve().parents[1]


def declared(path: Path = REPO / "prefect.yaml") -> list[dict[str, Any]]:
    return list(yaml.safe_load(path.read_text())["deployments"])


def _flow_for(entrypoint: str) -> Any:
    file, _, name = entrypoint.partition(":")
    module = file.removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module), name)


# -- schedules: from the inventory for the shipped deployments -------------------------


@dataclass(frozen=True)
class Planned:
    """One schedule of a deployment: cron in a time zone, the parameters its runs get
    (merged over the deployment's defaults) and where it comes from."""

    cron: str
    timezone: str
    parameters: dict[str, Any] = field(default_factory=dict)
    source: str = "prefect.yaml"


def _grouped(items: list[tuple[str, str]]) -> dict[str, list[str]]:
    """cron -> names, in inventory order."""
    out: dict[str, list[str]] = {}
    for name, cron in items:
        out.setdefault(cron, []).append(name)
    return out


def _by_schedule(inv: Inventory, items: list[tuple[str, str]], param: str, what: str
                 ) -> list[Planned]:
    """One schedule for everything when all items share a cron (no selection: items
    added later are included without re-serving), else one per cron selecting its items."""
    tz = inv.lab.timezone
    groups = _grouped(items)
    if len(groups) == 1:
        (cron, _names), = groups.items()
        return [Planned(cron, tz, {}, f"inventory: {what} (all)")]
    return [Planned(cron, tz, {param: names}, f"inventory: {what} {', '.join(names)}")
            for cron, names in groups.items()]


def _databases(inv: Inventory) -> list[Planned]:
    return _by_schedule(inv, [(d.name, d.schedule) for d in inv.databases], "databases",
                        "databases[].schedule")


def _path_sets(inv: Inventory) -> list[Planned]:
    return _by_schedule(inv, [(p.name, p.schedule) for p in inv.path_backups], "names",
                        "path_backups[].schedule")


def _apps(inv: Inventory) -> list[Planned]:
    """Only apps with a schedule, always by name: an app without one is updated on
    demand only, so no schedule may pick it up."""
    groups = _grouped([(a.name, a.schedule) for a in inv.apps if a.schedule])
    return [Planned(cron, inv.lab.timezone, {"apps": names},
                    f"inventory: apps[].schedule {', '.join(names)}")
            for cron, names in groups.items()]


def _vzdump_jobs(inv: Inventory) -> list[Planned]:
    return [Planned(j.schedule, inv.lab.timezone, {"job": j.name},
                    f"inventory: vzdump_jobs[{j.name}].schedule")
            for j in inv.vzdump_jobs if j.enabled]


def _repositories(inv: Inventory) -> list[Planned]:
    tz = inv.lab.timezone
    groups = _grouped([(r.name, r.maintenance_schedule) for r in inv.repositories])
    if len(groups) <= 1:
        return [Planned(cron, tz, {}, "inventory: repositories[].maintenance_schedule (all)")
                for cron in groups]
    return [Planned(r.maintenance_schedule, tz, {"repository": r.name},
                    f"inventory: repositories[{r.name}].maintenance_schedule")
            for r in inv.repositories]


def _drills(inv: Inventory) -> list[Planned]:
    """``target: all`` on ``drills.schedule`` while no drill has its own schedule;
    otherwise one schedule per drill target on its effective schedule."""
    from labkeeper.drill import plan_targets

    d = inv.drills
    prefix = {"database": "db", "guest": "guest", "repository": "repository",
              "paths": "paths"}
    own: dict[tuple[str, str], str | None] = {}
    for kind, name in plan_targets(inv, "all"):
        if kind == "database":
            own[(kind, name)] = inv.database(name).drill.schedule
        elif kind == "guest":
            g = inv.guest(name)
            own[(kind, name)] = g.drill.schedule if g.drill else None
        elif kind == "paths":
            own[(kind, name)] = d.paths.schedule
        else:
            own[(kind, name)] = d.repository.schedule
    if not own:
        return []
    if all(cron in (None, d.schedule) for cron in own.values()):
        return [Planned(d.schedule, inv.lab.timezone, {"target": "all"},
                        "inventory: drills.schedule (all)")]
    return [Planned(cron or d.schedule, inv.lab.timezone, {"target": f"{prefix[k]}:{n}"},
                    f"inventory: drill {prefix[k]}:{n}"
                    + (" schedule" if cron else " (drills.schedule)"))
            for (k, n), cron in own.items()]


def _backup_watch(inv: Inventory) -> list[Planned]:
    return [Planned(inv.notifications.missing_backup_schedule, inv.lab.timezone, {},
                    "inventory: notifications.missing_backup_schedule")]


FROM_INVENTORY: dict[str, tuple[str, Callable[[Inventory], list[Planned]]]] = {
    "nightly-pg-backup": ("flows/pg_backup.py:pg_backup_flow", _databases),
    "nightly-path-backup": ("flows/path_backup.py:path_backup_flow", _path_sets),
    "update-apps": ("flows/update.py:update_app_flow", _apps),
    "weekly-vzdump": ("flows/vzdump.py:vzdump_flow", _vzdump_jobs),
    "repo-maintenance": ("flows/repo_maintenance.py:repo_maintenance_flow", _repositories),
    "weekly-dr-drill": ("flows/dr_drill.py:dr_drill_flow", _drills),
    "backup-watch": ("flows/deadman.py:backup_watch_flow", _backup_watch),
}
"""Shipped deployment name -> (its entrypoint, how the inventory schedules it)."""


def plan_schedules(decl: Mapping[str, Any], inv: Inventory | None) -> list[Planned]:
    """The schedules a deployment gets: from the inventory for a shipped deployment
    (same name and entrypoint) when an inventory is given, else prefect.yaml's."""
    derive = FROM_INVENTORY.get(decl["name"])
    if inv is not None and derive is not None and derive[0] == decl["entrypoint"]:
        return derive[1](inv)
    return [Planned(s["cron"], s.get("timezone") or "UTC", dict(s.get("parameters") or {}))
            for s in decl.get("schedules") or []]


def _cron(p: Planned) -> Any:
    from prefect.schedules import Cron

    return Cron(p.cron, timezone=p.timezone, parameters=p.parameters or None)


def load_deployments(path: Path = REPO / "prefect.yaml", inv: Inventory | None = None
                     ) -> list[Any]:
    """RunnerDeployments for every deployment in prefect.yaml (same names, parameters
    and tags), scheduled as :func:`plan_schedules` says."""
    out = []
    for d in declared(path):
        flow = _flow_for(d["entrypoint"])
        out.append(flow.to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags") or [],
            parameters=d.get("parameters") or {},
            schedules=[_cron(p) for p in plan_schedules(d, inv)],
        ))
    return out


def schedule_table(inv: Inventory | None, path: Path = REPO / "prefect.yaml"
                   ) -> list[dict[str, Any]]:
    """Every deployment's planned schedules, for people (``labkeeper serve --schedules``)."""
    rows = []
    for d in declared(path):
        planned = plan_schedules(d, inv)
        if not planned:
            rows.append({"deployment": d["name"], "cron": "-", "timezone": "-",
                         "parameters": {}, "source": "on demand"})
        rows += [{"deployment": d["name"], "cron": p.cron, "timezone": p.timezone,
                  "parameters": p.parameters, "source": p.source} for p in planned]
    return rows


def sync_schedules(inv: Inventory, path: Path = REPO / "prefect.yaml") -> list[str]:
    """Several machines: replace the schedules of the deployments ``prefect deploy
    --all`` created on the Prefect server (``PREFECT_API_URL``) with the planned ones.
    Returns one line per deployment changed; a deployment not on the server is an error."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    wanted = [(f"{_flow_for(d['entrypoint']).name}/{d['name']}", plan_schedules(d, inv))
              for d in declared(path) if d["name"] in FROM_INVENTORY]

    async def go() -> list[str]:
        done = []
        async with get_client() as client:
            for full_name, planned in wanted:
                dep = await client.read_deployment_by_name(full_name)
                for s in await client.read_deployment_schedules(dep.id):
                    await client.delete_deployment_schedule(dep.id, s.id)
                if planned:
                    await client.create_deployment_schedules(dep.id, [
                        DeploymentScheduleCreate(schedule=_schedule(p), active=True,
                                                 parameters=p.parameters) for p in planned])
                done.append(f"{full_name}: " + ("; ".join(
                    f"{p.cron} {p.timezone} {p.parameters or ''}".rstrip() for p in planned)
                    or "on demand"))
        return done

    return asyncio.run(go())


def _schedule(p: Planned) -> Any:
    from prefect.client.schemas.schedules import CronSchedule

    return CronSchedule(cron=p.cron, timezone=p.timezone)


def serve_all(inv: Inventory | None = None, *, metrics_address: str | None = None,
              metrics_port: int | None = None) -> None:
    """Serve every deployment until interrupted; with ``metrics_port`` also serve
    ``/metrics`` (from the inventory's metrics store) alongside, stopped on the way out."""
    from prefect import serve

    from labkeeper import metrics

    server: Any = None
    if metrics_port is not None:
        from labkeeper.inventory import Settings

        state_dir = (inv.settings if inv is not None else Settings()).state_dir
        server = metrics.serve(state_dir, metrics_address or "127.0.0.1", metrics_port)
    try:
        serve(*load_deployments(inv=inv))
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
