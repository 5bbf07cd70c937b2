"""YAML text with comments, for the inventory ``labkeeper init`` writes.

PyYAML drops comments, so the document is emitted line by line from plain data in which
any value may be a :class:`Note` (a comment after it, comment lines above it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml


@dataclass(frozen=True)
class Note:
    """A value with comments: ``above`` lines before its key, ``comment`` after it."""

    value: Any
    comment: str = ""
    above: tuple[str, ...] = ()


_PLAIN = re.compile(r"[A-Za-z0-9_./@+~-]+")


def scalar(value: Any) -> str:
    """One YAML scalar; strings stay plain only where every YAML reader keeps them strings."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and _reads_back(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def _reads_back(text: str) -> bool:
    try:
        return bool(yaml.safe_load(text) == text)
    except yaml.YAMLError:
        return False


def unwrap(raw: Any) -> tuple[Any, str, tuple[str, ...]]:
    if isinstance(raw, Note):
        return raw.value, raw.comment, raw.above
    return raw, "", ()


def _is_block(value: Any) -> bool:
    if isinstance(value, Mapping):
        return bool(value)
    if isinstance(value, list):
        return any(isinstance(unwrap(v)[0], Mapping) or isinstance(v, Note) for v in value)
    return False


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(scalar(unwrap(v)[0]) for v in value) + "]"
    return scalar(value)


def _comments(lines: Iterable[str], pad: str) -> list[str]:
    return [f"{pad}# {c}".rstrip() for c in lines]


def emit(value: Any, indent: int = 0) -> list[str]:
    """YAML lines for a mapping or a list (values may be :class:`Note`)."""
    if isinstance(value, Mapping):
        return _emit_map(value, indent)
    return _emit_list(value, indent)


def _emit_map(mapping: Mapping[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for key, raw in mapping.items():
        value, comment, above = unwrap(raw)
        lines += _comments(above, pad)
        tail = f"  # {comment}" if comment else ""
        if _is_block(value):
            lines.append(f"{pad}{key}:{tail}")
            lines += emit(value, indent + 2)
        else:
            lines.append(f"{pad}{key}: {_inline(value)}{tail}")
    return lines


def _emit_list(items: Sequence[Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for raw in items:
        value, comment, above = unwrap(raw)
        lines += _comments(above, pad)
        tail = f"  # {comment}" if comment else ""
        if isinstance(value, Mapping) and value:
            body = _emit_map(value, indent + 2)
            lines.append(f"{pad}- {body[0][indent + 2:]}{tail}")
            lines += body[1:]
        else:
            lines.append(f"{pad}- {_inline(value)}{tail}")
    return lines
