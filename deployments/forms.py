"""The Run forms of the deployments: Prefect's parameter schema, made for people.

Prefect builds each deployment's parameter schema from its flow function: the types and
defaults from the signature, each parameter's description from the ``Args:`` section
of the flow's docstring. It titles every field with the bare parameter name, though,
and knows nothing about the lab. :func:`run_form` starts from Prefect's schema and adds

- a human title for every parameter (:data:`TITLES`, :data:`FLOW_TITLES`);
- choices (an ``enum``) where a parameter names something: the runbooks for the
  generic runbook flow always; with an inventory, the lab's databases, path sets,
  apps, vzdump jobs, repositories, guests, ... (:data:`CHOICES`, and a runbook's
  inventory-typed parameters).

``labkeeper serve`` serves the deployments with these forms; ``labkeeper serve
--sync-schedules`` puts them on the deployments ``prefect deploy --all`` created (which
carry Prefect's plain schema until then). Internal tuning knobs are not flow
parameters at all: they live in the inventory's ``settings.tuning``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from labkeeper.inventory import Inventory

TITLES: dict[str, str] = {
    "lab": "Inventory file",
    "databases": "Databases",
    "database": "Database",
    "repository": "Repository",
    "host": "Host",
    "names": "Path sets",
    "apps": "Apps",
    "app": "App",
    "tag": "Apps with this tag",
    "dry_run": "Dry run (change nothing)",
    "force": "Force",
    "canary": "Canary (stop the batch after a rollback)",
    "resolve": "Decision on an unfinished update",
    "target": "Drill target",
    "prune": "Prune",
    "check": "Check the repository",
    "read_data_subset": "Also read back data (subset)",
    "allow_restart": "Allow restarts",
    "allow_destroy": "Allow destroying guests",
    "yes": "Confirm",
    "plan_only": "Plan only",
    "bootstrap": "Bootstrap guests",
    "job": "vzdump job",
    "selection": "Ad-hoc selection",
    "storage": "Ad-hoc storage",
    "dry_run_retention": "Retention dry run",
    "task_timeout": "Timeout per guest (seconds)",
    "remind_hours": "Remind every (hours)",
    "name": "Runbook",
    "params": "Runbook parameters (JSON)",
    "snapshot": "Snapshot",
    "guest": "Guest",
    "guests": "Guests",
    "archive": "Archive",
    "over_original": "Over the original",
    "vmid": "New VMID",
    "into": "New database name",
    "start": "Start it",
    "servers": "PITR servers",
    "seed": "Random seed",
}
"""Parameter name -> the title on every Run form (others: the name, capitalised)."""

FLOW_TITLES: dict[tuple[str, str], str] = {
    ("provision", "yes"): "Accept a large plan",
    ("runbook", "yes"): "Approve every step up front",
}
"""(flow name, parameter) -> a title that differs from :data:`TITLES` for that flow."""


def _names(items: Iterable[Any]) -> list[str]:
    return [i.name for i in items]


def _pitr_servers(inv: Inventory) -> list[Any]:
    from labkeeper.inventory.pitr import pitr_servers

    return pitr_servers(inv)


CHOICES: dict[tuple[str, str], Callable[[Inventory], list[str]]] = {
    ("pg_backup", "databases"): lambda inv: _names(inv.databases),
    ("pg_backup", "repository"): lambda inv: _names(inv.repositories),
    ("path_backup", "names"): lambda inv: _names(inv.path_backups),
    ("path_backup", "host"): lambda inv: sorted({p.host for p in inv.path_backups}),
    ("update-app", "apps"): lambda inv: _names(inv.apps),
    ("vzdump", "job"): lambda inv: _names(inv.vzdump_jobs),
    ("repo_maintenance", "repository"): lambda inv: _names(inv.repositories),
    ("restore-database", "database"): lambda inv: _names(inv.databases),
    ("restore-guest", "guest"): lambda inv: [g.name for g in inv.guests if g.name],
    **{(f, "servers"): lambda inv: _names(_pitr_servers(inv))
       for f in ("pitr_base_backup", "pitr_wal_ship", "pitr_drill")},
}
"""(flow name, parameter) -> what it may name in this lab."""

RUNBOOK_CHOICES: dict[tuple[str, str], Callable[[Inventory], list[str]]] = {
    ("pitr-restore-database", "server"): lambda inv: _names(_pitr_servers(inv)),
}
"""(runbook name, parameter) -> what a plain ``string`` parameter may name in this lab."""


def valid_defaults(flow_name: str, params: Mapping[str, Any], inv: Inventory | None
                   ) -> dict[str, Any]:
    """prefect.yaml's default parameters that this lab can run. A default naming
    something the inventory does not have (``job: weekly-all`` in a lab whose only
    vzdump job is ``demo``) would fail the Run form's choices, so it is left out and the
    form asks instead (a scheduled run always carries its own parameters)."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        pick = CHOICES.get((flow_name, name))
        known = pick(inv) if pick is not None and inv is not None else []
        values = value if isinstance(value, list) else [value]
        if known and any(v not in known for v in values):
            continue
        out[name] = value
    return out


def title(flow_name: str, param: str) -> str:
    return FLOW_TITLES.get((flow_name, param)) or TITLES.get(param) or \
        param.replace("_", " ").capitalize()


def _choices(flow: Any, inv: Inventory | None) -> dict[str, list[str]]:
    """Parameter -> its choices, for this flow (and lab)."""
    from labkeeper import runbook as rb

    out: dict[str, list[str]] = {}
    path = getattr(flow.fn, "runbook_path", None)
    if flow.name == "runbook" and path is None:
        out["name"] = list(rb.runbook_files())
    if inv is None:
        return out
    if path is not None:
        book = rb.load_runbook(path)
        for pname, p in book.params.items():
            pick = RUNBOOK_CHOICES.get((book.name, pname))
            known = p.choices or rb.inventory_choices(inv, p.type) or (
                pick(inv) if pick is not None else None)
            if known:
                out[pname] = list(known)
    for (fname, pname), pick in CHOICES.items():
        if fname == flow.name:
            out[pname] = pick(inv)
    return out


def _with_enum(prop: dict[str, Any], choices: list[str]) -> None:
    """Choices on a string or list-of-strings field, also inside ``anyOf`` (optional
    ones); no choices (nothing of that kind in the lab) leave the field free."""
    if not choices:
        return
    for sub in prop.get("anyOf") or [prop]:
        if sub.get("type") == "array":
            sub.setdefault("items", {})["enum"] = list(choices)
        elif sub.get("type") == "string":
            sub["enum"] = list(choices)


def _plain_optional(prop: dict[str, Any]) -> dict[str, Any]:
    """``X | None = None`` as a plain optional field of type X: Prefect's UI shows
    ``anyOf [X, null]`` as a type picker ("str | None", "Property is type None"); an
    empty optional field is simply not sent, and the flow's default (None) applies."""
    subs = prop.get("anyOf") or []
    real = [s for s in subs if s.get("type") != "null"]
    if len(subs) != 2 or len(real) != 1 or prop.get("default", ...) is not None:
        return prop
    out = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
    return {**real[0], **out}


def run_form(flow: Any, inv: Inventory | None = None) -> dict[str, Any]:
    """The flow's parameter schema as Prefect computes it, with human titles, the
    choices :func:`_choices` knows and optional fields without a type picker (a JSON
    schema, ``parameter_openapi_schema``)."""
    from prefect.utilities.callables import parameter_schema

    schema = copy.deepcopy(parameter_schema(flow).model_dump_for_openapi())
    choices = _choices(flow, inv)
    props = schema.get("properties", {})
    for pname in list(props):
        prop = props[pname] = _plain_optional(props[pname])
        prop["title"] = title(flow.name, pname)
        if pname in choices:
            _with_enum(prop, choices[pname])
    return schema


def apply_form(deployment: Any, flow: Any, inv: Inventory | None = None) -> Any:
    """A RunnerDeployment (``flow.to_deployment``) with :func:`run_form`'s schema."""
    from prefect.utilities.callables import ParameterSchema

    deployment._parameter_openapi_schema = ParameterSchema(**run_form(flow, inv))
    return deployment


async def put_forms(client: Any, flow: Any, names: Iterable[str],
                    inv: Inventory | None = None) -> None:
    """Give the deployments ``names`` of ``flow`` on the server :func:`run_form`'s
    schema (after ``prefect deploy``, which stores Prefect's plain one)."""
    from prefect.client.schemas.actions import DeploymentUpdate

    form = run_form(flow, inv)
    for name in names:
        dep = await client.read_deployment_by_name(f"{flow.name}/{name}")
        await client.update_deployment(dep.id, DeploymentUpdate(parameter_openapi_schema=form))
