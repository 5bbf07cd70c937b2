"""Views the cross-reference checks run on: of a validated inventory, or of a document
that failed validation, where each part is validated on its own and what does not
validate is kept as a partial object (its invalid fields None)."""

from __future__ import annotations

import types
import typing
from typing import TYPE_CHECKING, Any, Union

from pydantic import TypeAdapter, ValidationError

from labkeeper.inventory.apps import App
from labkeeper.inventory.base import _Model
from labkeeper.inventory.databases import Database
from labkeeper.inventory.drills import Drills
from labkeeper.inventory.guests import Guest
from labkeeper.inventory.hosts import Host, SshDefaults
from labkeeper.inventory.path_backups import PathBackup
from labkeeper.inventory.proxmox import Proxmox, Storage
from labkeeper.inventory.repositories import Repository
from labkeeper.inventory.roles import Role
from labkeeper.inventory.vzdump import VzdumpJob
from labkeeper.inventory.xref import View

if TYPE_CHECKING:
    from labkeeper.inventory.root import Inventory


def view_of_model(inv: Inventory) -> View:
    """The view of a validated inventory: every item, every name."""
    view = View(
        proxmox=inv.proxmox,
        ssh=inv.ssh,
        hosts=list(enumerate(inv.hosts)),
        guests=list(enumerate(inv.guests)),
        roles=dict(inv.roles),
        databases=list(enumerate(inv.databases)),
        repositories=list(enumerate(inv.repositories)),
        vzdump_jobs=list(enumerate(inv.vzdump_jobs)),
        apps=list(enumerate(inv.apps)),
        path_backups=list(enumerate(inv.path_backups)),
        drills=inv.drills,
        storages=list(enumerate(inv.proxmox.storages)) if inv.proxmox else [],
        has_proxmox=inv.proxmox is not None,
    )
    nodes = [n.name for n in inv.proxmox.nodes] if inv.proxmox else []
    view.known = {
        "node": set(nodes),
        "storage": {s.name for _, s in view.storages},
        "guest": {g.name for g in inv.guests},
        "vmid": {g.vmid for g in inv.guests},
        "host": {h.name for h in inv.hosts},
        "role": set(inv.roles),
        "database": {d.name for d in inv.databases},
        "repository": {r.name for r in inv.repositories},
        "drill_server": {s.name for s in inv.drills.servers},
    }
    return view


def view_of_data(data: dict[str, Any]) -> View:
    """Validate each part on its own; an item that does not validate is kept as a
    partial object whose invalid fields are None (they are reported by the schema
    and the checks on them are suppressed)."""
    view = View()

    def one(key: str, model: type[_Model]) -> Any:
        return _partial(model, data[key]) if key in data else model()

    def many(value: Any, model: type[_Model]) -> list[tuple[int, Any]]:
        out: list[tuple[int, Any]] = []
        if isinstance(value, list):
            for i, item in enumerate(value):
                obj = _partial(model, item)
                if obj is not None:
                    out.append((i, obj))
        return out

    proxmox = data.get("proxmox")
    view.has_proxmox = proxmox is not None
    view.proxmox = _partial(Proxmox, proxmox) if proxmox is not None else None
    view.ssh = one("ssh", SshDefaults)
    pdata = proxmox if isinstance(proxmox, dict) else {}
    view.storages = many(pdata.get("storages"), Storage)
    view.hosts = many(data.get("hosts"), Host)
    view.guests = many(data.get("guests"), Guest)
    roles = data.get("roles")
    if isinstance(roles, dict):
        for name, role in roles.items():
            obj = _partial(Role, role)
            if obj is not None:
                view.roles[name] = obj
    view.databases = many(data.get("databases"), Database)
    view.repositories = many(data.get("repositories"), Repository)
    view.vzdump_jobs = many(data.get("vzdump_jobs"), VzdumpJob)
    view.apps = many(data.get("apps"), App)
    view.path_backups = many(data.get("path_backups"), PathBackup)
    view.drills = one("drills", Drills)
    view.known = _declared_names(data)
    return view


def _declared_names(data: dict[str, Any]) -> dict[str, set[Any]]:
    """The names (and vmids) the document declares, valid or not."""
    proxmox = data.get("proxmox")
    pdata = proxmox if isinstance(proxmox, dict) else {}
    roles = data.get("roles")
    ddata = data.get("drills")
    servers = ddata.get("servers") if isinstance(ddata, dict) else None
    return {
        "node": _raw_values(pdata.get("nodes"), "name"),
        "storage": _raw_values(pdata.get("storages"), "name"),
        "guest": _raw_values(data.get("guests"), "name"),
        "vmid": _raw_values(data.get("guests"), "vmid"),
        "host": _raw_values(data.get("hosts"), "name"),
        "role": set(roles) if isinstance(roles, dict) else set(),
        "database": _raw_values(data.get("databases"), "name"),
        "repository": _raw_values(data.get("repositories"), "name"),
        "drill_server": _raw_values(servers, "name"),
    }


_FIELD_ADAPTERS: dict[tuple[type, str], TypeAdapter[Any]] = {}


def _model_in(annotation: Any) -> type[_Model] | None:
    """The model class of ``X`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, _Model):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _model_in(args[0])
    return None


def _partial(cls: type[_Model], raw: Any) -> Any:
    """``cls`` validated from ``raw``; failing that, a partial object built field by
    field (invalid or missing required fields are None; nested models recurse)."""
    try:
        return cls.model_validate(raw)
    except ValidationError:
        pass
    if not isinstance(raw, dict):
        return None
    values: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name not in raw:
            required = info.is_required()
            values[name] = None if required else info.get_default(call_default_factory=True)
            continue
        adapter = _FIELD_ADAPTERS.get((cls, name))
        if adapter is None:
            adapter = _FIELD_ADAPTERS[(cls, name)] = TypeAdapter(info.rebuild_annotation())
        try:
            values[name] = adapter.validate_python(raw[name])
        except ValidationError:
            sub = _model_in(info.annotation)
            values[name] = _partial(sub, raw[name]) if sub is not None else None
    return cls.model_construct(**values)


def _raw_values(items: Any, key: str) -> set[Any]:
    out: set[Any] = set()
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                value = item.get(key)
                if isinstance(value, (str, int)) and not isinstance(value, bool):
                    out.add(value)
    return out
