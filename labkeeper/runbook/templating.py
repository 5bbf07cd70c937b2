"""Runbook templating, as data and never as text for a shell (pure).

``{{ expr }}`` inside a string is replaced by the value; a string that is exactly one
``{{ expr }}`` takes the value with its type (a list stays a list). Each argv element
stays one argument whatever it contains, and an argument a program reads as code
(:func:`code_arguments`: the script of ``sh -c``, ``python -c``, ``psql -c`` ...) takes
no template at all.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from labkeeper.errors import PermanentError

_SHELLS = frozenset({"sh", "bash", "dash", "zsh", "ksh", "ash", "mksh", "busybox"})
_CODE_FLAGS = {  # program -> the options whose value is code (a script, SQL, ...)
    **{sh: ("-c",) for sh in _SHELLS},
    "su": ("-c", "--command"), "runuser": ("-c", "--command"),
    "python": ("-c",), "python3": ("-c",), "perl": ("-e", "-E"), "ruby": ("-e",),
    "node": ("-e", "--eval"), "psql": ("-c", "--command"),
}


def _is_code_flag(program: str, arg: str) -> bool:
    flags = _CODE_FLAGS.get(program, ())
    if arg in flags:
        return True
    # a shell's clustered short options: -ec, -lc, -xec ...
    return (program in _SHELLS and arg.startswith("-") and not arg.startswith("--")
            and "c" in arg[1:])


def code_arguments(argv: Sequence[str]) -> list[int]:
    """Indexes of ``argv`` elements that a program reads as code: the script of
    ``sh -c SCRIPT`` (``bash -ec``, ``su -c``, ``python -c``, ``psql -c`` ...), also
    after ``sudo``/``env``/``nice``. Pure."""
    out: list[int] = []
    program = ""
    pending = False
    for i, arg in enumerate(argv):
        if pending and not arg.startswith("-"):
            out.append(i)
            pending = False
        elif posixpath.basename(arg) in _CODE_FLAGS and not arg.startswith("-"):
            program, pending = posixpath.basename(arg), False
        elif program and _is_code_flag(program, arg):
            pending = True
        elif program and arg.startswith(tuple(f"{f}=" for f in _CODE_FLAGS.get(program, ())
                                              if f.startswith("--"))):
            out.append(i)
    return out


EXPR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


class TemplateError(PermanentError):
    """A ``{{ expr }}`` that names nothing."""


def lookup(ctx: Mapping[str, Any], expr: str) -> Any:
    node: Any = ctx
    for part in expr.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            known = ", ".join(sorted(node)) if isinstance(node, Mapping) else "-"
            raise TemplateError(f"{{{{ {expr} }}}}: nothing named {part!r} here "
                                f"(known: {known})")
    return node


def render(value: Any, ctx: Mapping[str, Any]) -> Any:
    """Substitute ``{{ expr }}`` in every string of ``value`` (as data, see module doc)."""
    if isinstance(value, str):
        whole = EXPR.fullmatch(value.strip())
        if whole:
            return lookup(ctx, whole.group(1))
        return EXPR.sub(lambda m: _text(lookup(ctx, m.group(1))), value)
    if isinstance(value, list):
        return [render(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx) for k, v in value.items()}
    return value


def render_argv(argv: Sequence[str], ctx: Mapping[str, Any]) -> tuple[str, ...]:
    """An argv with each element rendered to exactly one string argument. A code
    argument (:func:`code_arguments`) with a template is refused, never rendered."""
    for i in code_arguments(argv):
        if EXPR.search(argv[i]):
            raise TemplateError(f"ssh.argv[{i}] is code (what {argv[i - 1]} runs): {{{{ }}}} is "
                                "refused there; pass the value as a positional argument")
    return tuple(_text(render(a, ctx)) for a in argv)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return ",".join(_text(v) for v in value)
    return str(value)


def expressions(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield from (m.group(1) for m in EXPR.finditer(value))
    elif isinstance(value, list):
        for v in value:
            yield from expressions(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from expressions(v)
