"""The configuration reference (docs/CONFIGURATION.md), generated from the inventory
models so it cannot drift: ``python -m labkeeper.docgen > docs/CONFIGURATION.md``."""

from __future__ import annotations

import types
import typing
from pathlib import PurePath
from typing import Any, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from labkeeper.inventory import Inventory


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(get_args(tp)[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in get_args(tp))
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    if origin in (list, tuple, set, frozenset):
        args = get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        k, v = get_args(tp) or (str, Any)
        return f"map {_type_name(k)} → {_type_name(v)}"
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _models(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out: list[type[BaseModel]] = []
    for a in get_args(tp):
        out += _models(a)
    return out


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        return "(computed)"
    d = field.default
    if d is PydanticUndefined:
        return ""
    if isinstance(d, BaseModel):
        return "(defaults)"
    if isinstance(d, PurePath):
        return f"`{d}`"
    return f"`{d!r}`" if d not in (None, [], {}) else ("`null`" if d is None else f"`{d!r}`")


def render() -> str:
    lines = ["# Inventory reference", "",
             "Generated from `labkeeper/inventory/` by `python -m labkeeper.docgen`; a test",
             "keeps this file equal to the models. `lab.example.yaml` is a complete example.",
             "Fields holding secrets take references (`env:NAME`, `file:/path`,",
             "`prefect-block:NAME`), never values. Unknown keys are errors.", ""]
    seen: set[type[BaseModel]] = set()
    queue: list[tuple[str, type[BaseModel]]] = [("(top level)", Inventory)]
    while queue:
        where, model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        lines += [f"## {model.__name__}", "", f"Used at: {where}", ""]
        doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        if doc and not doc.startswith("Usage docs"):
            lines += [doc, ""]
        lines += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("\n", " ").replace("|", "\\|")
            lines.append(f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} "
                         f"| {desc} |")
            for sub in _models(field.annotation):
                queue.append((f"`{model.__name__}.{name}`", sub))
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
