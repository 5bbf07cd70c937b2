"""Loading the inventory from YAML, with every problem reported at once as
``FILE:LINE field.path[3].name: message``: YAML syntax errors, duplicate keys, schema
errors and cross-reference errors alike.

The YAML dialect is YAML 1.1 as PyYAML reads it, except that only ``true``/``false``
are booleans (``on``, ``yes``, ``no`` stay strings: the Norway problem) and ``22:00``
is the string ``"22:00"``, not 1320 (no sexagesimal numbers) and dates stay strings
(see :mod:`labkeeper.yaml_loader`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from labkeeper.errors import ConfigError
from labkeeper.inventory.base import _FIELDS_KEY, _SKIP_XREF_KEY, _did_you_mean
from labkeeper.inventory.root import Inventory, cross_reference
from labkeeper.inventory.view import view_of_data, view_of_model
from labkeeper.inventory.xref import Loc
from labkeeper.yaml_loader import Document as _Document
from labkeeper.yaml_loader import Problem, UnreadableFile, format_path, read_source


def problems_report(problems: Sequence[Problem], *, source: str | None = None) -> str:
    """Every problem, one a line, under a count — what ``labkeeper validate`` prints."""
    name = source or (problems[0].file if problems else "inventory")
    if not problems:
        return f"{name}: valid"
    n = len(problems)
    lines = [f"{name}: {n} problem{'s' if n != 1 else ''}"]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Schema errors -> problems
# --------------------------------------------------------------------------------------


def _data_path(data: Any, loc: Sequence[Any], keep_last: bool) -> tuple[Loc, Any]:
    """Map a pydantic loc onto the document: drop parts that are not in the data
    (union tags, validator names). Returns the path and the parent container."""
    parts = list(loc)
    last = parts.pop() if keep_last and parts else None
    node = data
    out: list[str | int] = []
    parent: Any = None
    for part in parts:
        if isinstance(node, dict) and part in node:
            parent, node = node, node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parent, node = node, node[part]
            out.append(part)
    if last is not None:
        out.append(last)
        parent = node
    return tuple(out), parent


_TEMPLATES = {
    "greater_than_equal": "must be ≥ {ge}",
    "less_than_equal": "must be ≤ {le}",
    "greater_than": "must be > {gt}",
    "less_than": "must be < {lt}",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "must match {pattern}",
}
_FIXED = {
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "path_type": "must be a path",
    "string_too_short": "must not be empty",
}


def _message(err: Any, key: Any, parent: Any, ctx: dict[str, Any]) -> str:
    typ = err["type"]
    c = err.get("ctx") or {}
    if typ == "missing":
        return "required field is missing"
    if typ == "extra_forbidden":
        fields = ctx.get(_FIELDS_KEY, {}).get(id(parent), ())
        hint = _did_you_mean(str(key), fields)
        shown = str(key) if len(str(key)) <= 40 else str(key)[:37] + "..."
        return f"unknown key {shown!r}{hint}"
    if typ in _TEMPLATES:
        return _TEMPLATES[typ].format(**c)
    if typ in ("value_error", "assertion_error"):
        return str(c.get("error", err["msg"]))
    if typ in _FIXED:
        return _FIXED[typ]
    if typ == "too_short":
        n = c.get("min_length", 1)
        return f"must have at least {n} item{'s' if n != 1 else ''}"
    if typ == "too_long":
        return f"must have at most {c.get('max_length')} items"
    if typ == "string_too_long":
        return f"must be at most {c.get('max_length')} characters"
    return str(err["msg"])


def _schema_problems(exc: ValidationError, doc: _Document, ctx: dict[str, Any]) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        keep_last = err["type"] == "missing"
        loc, parent = _data_path(doc.data, err["loc"], keep_last)
        key = loc[-1] if loc else None
        message = _message(err, key, parent, ctx)
        problems.append(Problem(doc.filename, doc.line_of(loc), format_path(loc), message, loc))
    return problems


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _check_document(text: str, filename: str) -> tuple[Inventory | None, list[Problem]]:
    doc = _Document(text, filename)
    problems = list(doc.problems)
    if doc.data is None and problems:
        return None, problems
    if not isinstance(doc.data, dict):
        problems.append(
            Problem(filename, 1, "", "the top level must be a mapping (version: 1, lab: ...)")
        )
        return None, problems
    ctx: dict[str, Any] = {_SKIP_XREF_KEY: True}
    inventory: Inventory | None = None
    try:
        inventory = Inventory.model_validate(doc.data, context=ctx)
    except ValidationError as exc:
        # a value the YAML layer already reported (as None) is not reported twice
        reported = {p.loc for p in doc.problems}
        problems += [p for p in _schema_problems(exc, doc, ctx) if p.loc not in reported]
    view = view_of_model(inventory) if inventory is not None else view_of_data(doc.data)
    view.bad = {p.loc for p in problems if p.loc}
    for loc, message in cross_reference(view):
        if view.suppressed(loc):
            continue
        problems.append(Problem(filename, doc.line_of(loc), format_path(loc), message, loc))
    problems = _dedupe(problems)
    problems.sort(key=lambda p: (p.line or 0))
    return (inventory if not problems else None), problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in problems:
        key = (p.line, p.path, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def validate_text(text: str, filename: str = "<inventory>") -> list[Problem]:
    """Every problem in an inventory given as text (empty list: valid)."""
    return _check_document(text, filename)[1]


def validate_file(path: str | Path) -> list[Problem]:
    """Every problem in an inventory file (empty list: valid)."""
    try:
        text = read_source(path)
    except UnreadableFile as exc:
        return [exc.problem]
    return validate_text(text, str(path))


def parse_inventory(text: str, filename: str = "<inventory>") -> Inventory:
    """Parse and validate inventory text; raise :class:`ConfigError` listing every problem."""
    inventory, problems = _check_document(text, filename)
    if inventory is None or problems:
        n = len(problems)
        raise ConfigError(
            f"{filename}: {n} problem{'s' if n != 1 else ''} in the inventory",
            problems=[str(p) for p in problems],
        )
    return inventory


def load_inventory(path: str | Path) -> Inventory:
    """Load and validate an inventory file; raise :class:`ConfigError` listing every problem."""
    try:
        text = read_source(path)
    except UnreadableFile as exc:
        raise ConfigError(f"{path}: cannot read the inventory",
                          problems=[str(exc.problem)]) from None
    return parse_inventory(text, str(path))
