"""Runbook parameters: typed and checked against the inventory before any step runs, and
the template context they give (with derived values such as ``<guest>_vmid``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from labkeeper.errors import ConfigError
from labkeeper.inventory import Inventory, _did_you_mean
from labkeeper.runbook.models import Param, Runbook

DERIVED = {
    "guest": ("vmid", "node", "databases", "apps"),
    "app": ("guest",),
    "database": ("guest",),
    "vzdump_job": ("tag", "storage"),
}
_SNAPSHOT = re.compile(r"^(latest|[0-9a-f]{8,64})$")
_ARCHIVE = re.compile(r"^(latest|[A-Za-z0-9_.-]+:backup/[A-Za-z0-9_.+-]+)$")


def parse_cli_params(pairs: Iterable[str]) -> dict[str, str]:
    """``k=v`` pairs from the command line (values stay strings until validated)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {pair!r}: expected NAME=VALUE")
        out[key.strip()] = value
    return out


def inventory_choices(inv: Inventory, ptype: str) -> list[str] | None:
    table: dict[str, Callable[[], list[str]]] = {
        "database": lambda: [d.name for d in inv.databases],
        "guest": lambda: [g.name for g in inv.guests if g.name],
        "app": lambda: [a.name for a in inv.apps],
        "host": lambda: sorted(inv.ssh_targets()),
        "path_set": lambda: [p.name for p in inv.path_backups],
        "vzdump_job": lambda: [j.name for j in inv.vzdump_jobs],
    }
    return table[ptype]() if ptype in table else None


def _one_value(name: str, p: Param, raw: Any, inv: Inventory) -> Any:
    where = f"parameter {name}"
    if p.type == "int":
        return _int_value(where, raw)
    if p.type == "bool":
        return _bool_value(where, raw)
    return _text_value(where, p, raw, inv)


def _int_value(where: str, raw: Any) -> int:
    if isinstance(raw, bool):
        raise ConfigError(f"{where}: {raw!r} is not an integer")
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {raw!r} is not an integer") from None


def _bool_value(where: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off"):
        return False
    raise ConfigError(f"{where}: {raw!r} is not true or false")


def _text_value(where: str, p: Param, raw: Any, inv: Inventory) -> str:
    if not isinstance(raw, str | int) or isinstance(raw, bool):
        raise ConfigError(f"{where}: expected a string, got {type(raw).__name__}")
    value = str(raw)
    if "\x00" in value or "\n" in value:
        raise ConfigError(f"{where}: newlines and NUL bytes are not allowed")
    known = inventory_choices(inv, p.type)
    if known is not None and value not in known:
        raise ConfigError(f"{where}: no {p.type.replace('_', ' ')} {value!r} in the inventory"
                          f"{_did_you_mean(value, known)} (known: {', '.join(known) or 'none'})")
    if p.type == "snapshot" and not _SNAPSHOT.match(value):
        raise ConfigError(f"{where}: {value!r} is not 'latest' or a restic snapshot id")
    if p.type == "archive" and not _ARCHIVE.match(value):
        raise ConfigError(f"{where}: {value!r} is not 'latest' or a vzdump volume id "
                          "(storage:backup/vzdump-...)")
    if p.choices is not None and value not in p.choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(p.choices)}")
    if p.pattern is not None and not re.fullmatch(p.pattern, value):
        raise ConfigError(f"{where}: {value!r} does not match {p.pattern}")
    return value


def bind_params(book: Runbook, given: Mapping[str, Any], inv: Inventory) -> dict[str, Any]:
    """Typed parameter values (defaults applied); :class:`ConfigError` names the
    parameter for anything unknown, missing or invalid, listing every problem."""
    problems: list[str] = []
    unknown = sorted(set(given) - set(book.params))
    for u in unknown:
        problems.append(f"parameter {u}: unknown{_did_you_mean(u, list(book.params))} "
                        f"(runbook {book.name} takes: {', '.join(book.params) or 'none'})")
    out: dict[str, Any] = {}
    for name, p in book.params.items():
        if name in given and given[name] is not None:
            raw = given[name]
        elif not p.required:
            raw = p.default
        else:
            problems.append(f"parameter {name}: required ({p.type}"
                            + (f": {p.description}" if p.description else "") + ")")
            continue
        try:
            if p.multiple:
                items = raw if isinstance(raw, list) else [x for x in str(raw).split(",") if x]
                out[name] = [_one_value(name, p, x, inv) for x in items]
            else:
                out[name] = _one_value(name, p, raw, inv)
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"runbook {book.name}: {len(problems)} parameter problem"
                          f"{'s' if len(problems) != 1 else ''}: " + "; ".join(problems),
                          problems)
    return out


def derived_values(book: Runbook, values: Mapping[str, Any], inv: Inventory) -> dict[str, Any]:
    """``<param>_vmid`` etc. for inventory-typed parameters (see the module doc)."""
    out: dict[str, Any] = {}
    for name, p in book.params.items():
        if p.multiple or name not in values:
            continue
        v = values[name]
        if p.type == "guest":
            g = inv.guest(v)
            out[f"{name}_vmid"] = g.vmid
            out[f"{name}_node"] = g.node
            out[f"{name}_databases"] = [d.name for d in inv.databases if d.guest == g.name]
            out[f"{name}_apps"] = [a.name for a in inv.apps if a.guest == g.name]
        elif p.type == "app":
            out[f"{name}_guest"] = inv.app(v).guest
        elif p.type == "database":
            out[f"{name}_guest"] = inv.database(v).guest or ""
        elif p.type == "vzdump_job":
            job = inv.vzdump_job(v)
            out[f"{name}_tag"] = job.selection.tags[0] if job.selection.tags else ""
            out[f"{name}_storage"] = job.storage
    return out


def context(book: Runbook, values: Mapping[str, Any], inv: Inventory, *, run_id: str,
            stamp: str) -> dict[str, Any]:
    return {**values, **derived_values(book, values, inv),
            "run": {"id": run_id, "stamp": stamp}, "steps": {}}


def truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "no", "0", "off", "none")
    return bool(value)
