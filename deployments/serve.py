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
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from labkeeper.inventory import Inventory

logger = logging.getLogger(__name__)
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
              "paths": "paths", "pitr": "pitr"}
    own: dict[tuple[str, str], str | None] = {}
    for kind, name in plan_targets(inv, "all"):
        if kind == "database":
            own[(kind, name)] = inv.database(name).drill.schedule
        elif kind == "guest":
            g = inv.guest(name)
            own[(kind, name)] = g.drill.schedule if g.drill else None
        elif kind == "paths":
            own[(kind, name)] = d.paths.schedule
        elif kind == "pitr":
            own[(kind, name)] = None  # drills.schedule
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


def ship_cron(minutes: int) -> str:
    """A cron firing every ``minutes`` (pure): ``*/m`` below an hour, else every
    ``minutes // 60`` hours."""
    return f"*/{minutes} * * * *" if minutes < 60 else f"0 */{min(23, minutes // 60)} * * *"


def _pitr_bases(inv: Inventory) -> list[Planned]:
    return _by_schedule(inv, [(s.name, s.base_schedule) for s in inv.pitr], "servers",
                        "pitr[].base_schedule")


def _pitr_ships(inv: Inventory) -> list[Planned]:
    return _by_schedule(inv, [(s.name, ship_cron(s.ship_interval_minutes)) for s in inv.pitr],
                        "servers", "pitr[].ship_interval_minutes")


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
    "pitr-base-backup": ("flows/pitr.py:pitr_base_backup_flow", _pitr_bases),
    "pitr-wal-ship": ("flows/pitr.py:pitr_wal_ship_flow", _pitr_ships),
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
    and tags), scheduled as :func:`plan_schedules` says, with the Run forms of
    deployments/forms.py."""
    from deployments.forms import apply_form, valid_defaults

    out = []
    for d in declared(path):
        flow = _flow_for(d["entrypoint"])
        out.append(apply_form(flow.to_deployment(
            name=d["name"], description=d.get("description"), tags=d.get("tags") or [],
            parameters=valid_defaults(flow.name, d.get("parameters") or {}, inv),
            schedules=[_cron(p) for p in plan_schedules(d, inv)],
        ), flow, inv))
    return out


def schedule_table(inv: Inventory | None, path: Path = REPO / "prefect.yaml"
                   ) -> list[dict[str, Any]]:
    """Every deployment's planned schedules, for people (``labkeeper serve --schedules``)."""
    rows = []
    for d in declared(path):
        planned = plan_schedules(d, inv)
        if not planned:
            derived = inv is not None and FROM_INVENTORY.get(d["name"], ("",))[0] == \
                d["entrypoint"]
            rows.append({"deployment": d["name"], "cron": "-", "timezone": "-",
                         "parameters": {}, "source": "inventory: nothing to schedule"
                         if derived else "on demand"})
        rows += [{"deployment": d["name"], "cron": p.cron, "timezone": p.timezone,
                  "parameters": p.parameters, "source": p.source} for p in planned]
    return rows


# -- sites: which work queue each deployment goes to (several machines) --------------

SPLIT: dict[str, tuple[str, str]] = {
    "nightly-pg-backup": ("databases", "databases"),
    "nightly-path-backup": ("path_backups", "names"),
    "weekly-vzdump": ("vzdump_jobs", "job"),
}
"""Deployments whose items carry ``site:`` -> (inventory section, selecting parameter).
Items on several sites make one deployment per site (``<name>-<site>`` besides the
default site's ``<name>``), each selecting its own items."""
WRITERS = frozenset({*SPLIT, "repo-maintenance"})
"""Deployments that write to restic repositories: one run at a time each (overlapping
triggers wait in the server's queue, whichever worker would take them)."""
PER_SITE = frozenset({"site-check"})
"""Deployments that every site gets a copy of (what can this site's worker reach?)."""
SPLIT_TAG = "labkeeper-site-copy"


@dataclass(frozen=True)
class Placement:
    """One deployment on the server: its name, site and queue, the default parameters it
    gets over prefect.yaml's (the site's items) and its schedules."""

    name: str
    site: str | None
    work_queue: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: list[Planned] = field(default_factory=list)


def _split_groups(decl: Mapping[str, Any], inv: Inventory) -> dict[str | None, list[Any]]:
    from labkeeper.inventory.sites import site_of

    section, _param = SPLIT[decl["name"]]
    groups: dict[str | None, list[Any]] = {}
    for item in getattr(inv, section):
        groups.setdefault(site_of(inv, item), []).append(item)
    return groups


def place(decl: Mapping[str, Any], inv: Inventory | None) -> list[Placement]:
    """Where a declared deployment runs: on its items' site's queue, one deployment per
    site when its items are on several; whole-lab jobs on the site that lists them (or
    the default site). Without an inventory or sites: the pool's ``default`` queue."""
    from labkeeper.inventory.sites import (
        DEFAULT_QUEUE,
        default_site,
        queue_of,
        site_of_deployment,
    )

    name = decl["name"]
    if inv is None:
        return [Placement(name, None, DEFAULT_QUEUE, {}, plan_schedules(decl, None))]
    if name in PER_SITE and inv.settings.sites:
        first = default_site(inv)
        return [Placement(name if site == first else f"{name}-{site}", site,
                          queue_of(inv, site), {}, plan_schedules(decl, inv))
                for site in inv.settings.sites]
    shipped = FROM_INVENTORY.get(name, ("", None))[0] == decl["entrypoint"]
    groups = _split_groups(decl, inv) if shipped and name in SPLIT else {}
    if len(groups) <= 1:
        site = next(iter(groups)) if groups else site_of_deployment(inv, name)
        return [Placement(name, site, queue_of(inv, site), {}, plan_schedules(decl, inv))]
    section, param = SPLIT[name]
    base = default_site(inv) if default_site(inv) in groups else next(iter(groups))
    out = []
    for site, items in groups.items():
        names = [i.name for i in items]
        sub = inv.model_copy(update={section: items})
        out.append(Placement(name if site == base else f"{name}-{site}", site,
                             queue_of(inv, site),
                             {param: names[0] if param == "job" else names},
                             plan_schedules(decl, sub)))
    return out


def placement_table(inv: Inventory | None, path: Path = REPO / "prefect.yaml"
                    ) -> list[dict[str, Any]]:
    """Every deployment's site and queue, for people and tests."""
    return [{"deployment": p.name, "site": p.site or "-", "work_queue": p.work_queue,
             "parameters": p.parameters}
            for d in declared(path) for p in place(d, inv)]


def sync_schedules(inv: Inventory, path: Path = REPO / "prefect.yaml") -> list[str]:
    """Several machines: make the deployments ``prefect deploy --all`` created on the
    Prefect server (``PREFECT_API_URL``) match the inventory: each on its site's work
    queue (queues created in the pool, per-site copies created or removed), the
    planned schedules, one run at a time for repository writers. Returns one line per
    deployment; a declared deployment not on the server is an error."""
    import asyncio

    from prefect.client.orchestration import get_client

    from deployments.forms import put_forms, valid_defaults

    async def go() -> list[str]:
        done: list[str] = []
        async with get_client() as client:
            for d in declared(path):
                flow_name = _flow_for(d["entrypoint"]).name
                d = {**d, "parameters": valid_defaults(flow_name, d.get("parameters") or {},
                                                       inv)}
                base = await client.read_deployment_by_name(f"{flow_name}/{d['name']}")
                placed = place(d, inv)
                await _ensure_queues(client, base.work_pool_name,
                                     {p.work_queue for p in placed})
                for p in placed:
                    done.append(await _apply(client, d, base, p, flow_name))
                await put_forms(client, _flow_for(d["entrypoint"]), [p.name for p in placed],
                                inv)
                await _remove_stale_copies(client, base, {p.name for p in placed})
        return done

    return asyncio.run(go())


async def _ensure_queues(client: Any, pool: str | None, queues: set[str]) -> None:
    from prefect.exceptions import ObjectAlreadyExists

    for q in sorted(queues):
        try:
            await client.create_work_queue(name=q, work_pool_name=pool)
        except ObjectAlreadyExists:
            pass


def _fields(decl: Mapping[str, Any], p: Placement) -> dict[str, Any]:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy, ConcurrencyOptions

    tags = [*(decl.get("tags") or []), *([f"site:{p.site}"] if p.site else []),
            *([SPLIT_TAG] if p.name != decl["name"] else [])]
    out: dict[str, Any] = {
        "work_queue_name": p.work_queue, "tags": tags,
        "parameters": {**(decl.get("parameters") or {}), **p.parameters}}
    if decl["name"] in WRITERS:
        out["concurrency_limit"] = 1
        out["concurrency_options"] = ConcurrencyOptions(
            collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
    return out


async def _apply(client: Any, decl: Mapping[str, Any], base: Any, p: Placement,
                 flow_name: str) -> str:
    """Create or update one placed deployment and replace its schedules."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate, DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    fields = _fields(decl, p)
    if p.name == decl["name"]:
        dep_id = base.id
        await client.update_deployment(dep_id, DeploymentUpdate(**fields))
    else:
        try:
            dep_id = (await client.read_deployment_by_name(f"{flow_name}/{p.name}")).id
            await client.update_deployment(dep_id, DeploymentUpdate(**fields))
        except ObjectNotFound:
            dep_id = await client.create_deployment(
                flow_id=base.flow_id, name=p.name, description=base.description,
                work_pool_name=base.work_pool_name, path=base.path,
                entrypoint=base.entrypoint, pull_steps=base.pull_steps,
                parameter_openapi_schema=base.parameter_openapi_schema,
                job_variables=base.job_variables, **fields)
    for s in await client.read_deployment_schedules(dep_id):
        await client.delete_deployment_schedule(dep_id, s.id)
    if p.schedules:
        await client.create_deployment_schedules(dep_id, [
            DeploymentScheduleCreate(schedule=_schedule(s), active=True,
                                     parameters=s.parameters) for s in p.schedules])
    where = f" [queue {p.work_queue}" + (f", site {p.site}]" if p.site else "]")
    return f"{flow_name}/{p.name}: " + ("; ".join(
        f"{s.cron} {s.timezone} {s.parameters or ''}".rstrip() for s in p.schedules)
        or "on demand") + where


async def _remove_stale_copies(client: Any, base: Any, keep: set[str]) -> None:
    """Per-site copies of ``base`` that the inventory no longer places (a site's items
    moved elsewhere): deleted, so no schedule keeps firing on a site that has no items."""
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterTags,
        FlowFilter,
        FlowFilterId,
    )

    copies = await client.read_deployments(
        flow_filter=FlowFilter(id=FlowFilterId(any_=[base.flow_id])),
        deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[SPLIT_TAG])))
    for dep in copies:
        if dep.name.startswith(f"{base.name}-") and dep.name not in keep:
            await client.delete_deployment(dep.id)


def _schedule(p: Planned) -> Any:
    from prefect.client.schemas.schedules import CronSchedule

    return CronSchedule(cron=p.cron, timezone=p.timezone)


def serve_all(inv: Inventory | None = None, *, metrics_address: str | None = None,
              metrics_port: int | None = None) -> None:
    """Serve every deployment until interrupted; with ``metrics_port`` also serve
    ``/metrics`` (from the inventory's metrics store) alongside, stopped on the way out;
    and ``labkeeper wal receive`` for each PITR server as a supervised child, stopped
    by its PID on the way out."""
    from labkeeper import metrics

    server: Any = None
    if metrics_port is not None:
        from labkeeper.inventory import Settings

        state_dir = (inv.settings if inv is not None else Settings()).state_dir
        server = metrics.serve(state_dir, metrics_address or "127.0.0.1", metrics_port)
    receivers = None
    try:
        receivers = start_wal_receivers(inv)
        run_served(load_deployments(inv=inv))
    finally:
        if receivers is not None:
            receivers.stop()
        if server is not None:
            server.shutdown()
            server.server_close()


def run_served(deployments: list[Any]) -> None:
    """Prefect's ``serve`` for these deployments, each one's flow object registered with
    the runner as ``flow.serve`` registers it: Prefect then starts a run from the flow
    in memory (a fork of a warm process: deployments/warm_start.py) instead of
    ``python -m prefect.engine`` re-importing it. Until interrupted."""
    import asyncio

    from prefect.exceptions import TerminationSignal
    from prefect.flows import _display_serve_start_message
    from prefect.runner import Runner

    from deployments import warm_start

    warm = warm_start.install()
    runner = Runner(pause_on_shutdown=True)
    for deployment in deployments:
        deployment_id = runner.add_deployment(deployment)
        if warm is not None:
            runner._deployment_registry.register_flow(
                deployment_id, _flow_for(deployment.entrypoint))
    _display_serve_start_message(*deployments)
    try:
        asyncio.run(runner.start())
    except (KeyboardInterrupt, TerminationSignal) as exc:
        logger.info("Received %s, shutting down...", type(exc).__name__)
    finally:
        warm_start.uninstall()


def start_wal_receivers(inv: Inventory | None, lab: str | None = None) -> Any:
    """One supervised ``labkeeper wal receive SERVER`` child per ``pitr:`` server, reading
    the inventory serve schedules from (``lab``, else ``$LABKEEPER_LAB``, which
    `labkeeper serve` sets); None when there is none to start."""
    import os

    lab = lab or os.environ.get("LABKEEPER_LAB")
    if inv is None or not inv.pitr or not lab:
        return None
    from labkeeper.pitr.service import ReceiverChildren, receiver_argv

    return ReceiverChildren({s.name: receiver_argv(s.name, Path(lab)) for s in inv.pitr}
                            ).start()
