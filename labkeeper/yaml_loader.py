"""Safe, bounded YAML loading with line numbers: the one way the inventory and the
runbooks are read.

Whatever the bytes, loading ends in :class:`Problem` values (``FILE:LINE: message``),
never in an exception or a hang:

- the input is capped (:data:`MAX_BYTES`) before PyYAML sees it, and a file is read
  no further than the cap (``/dev/zero`` is refused, not read);
- the loader is built inside the error handling: PyYAML's reader rejects control
  characters (ESC, NUL) while it is being *constructed*;
- nodes are counted and nesting is measured while the document is composed
  (:class:`_BoundedLoader`), aliases counted as the nodes they expand to, so a deeply
  nested ``[[[[...`` stops at :data:`MAX_DEPTH` before Python's recursion limit and a
  "billion laughs" stops at :data:`MAX_NODES` before anything is expanded;
- a syntax error names both places PyYAML knows: where the construct started (an
  unclosed ``[`` on line 6) and where the parser gave up (line 14).

The dialect is YAML 1.1 as PyYAML reads it, except that only ``true``/``false`` are
booleans (``on``, ``yes``, ``no`` stay strings: the Norway problem), ``22:00`` is the
string ``"22:00"`` (no sexagesimal numbers) and dates stay strings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from labkeeper.errors import ConfigError

Loc = tuple[str | int, ...]

MAX_BYTES = 1 << 20
"""Largest inventory or runbook read (a 50-guest lab's inventory is ~60 kB). PyYAML's
pure-Python parser (needed to count while composing) reads ~1 MB/s: a bound on time."""
MAX_NODES = 100_000
"""Most nodes a document may hold, aliases expanded (each use counts its whole tree;
lab.example.yaml has ~750)."""
MAX_DEPTH = 100
"""Deepest nesting of lists and mappings (the inventory needs fewer than 10 levels)."""

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MERGE_TAG = "tag:yaml.org,2002:merge"
_CONTROL_NAMES = {0x00: "NUL", 0x07: "BEL", 0x08: "BS", 0x1B: "ESC", 0x7F: "DEL"}
# contexts that name an opening a person must close: the start is the line to look at
_OPENED = re.compile(r"flow|quoted|while scanning")


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def format_path(loc: Sequence[str | int]) -> str:
    """``("guests", 3, "vmid")`` -> ``guests[3].vmid``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z0-9_-]+", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{str(part)!r}]"
    return out


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an inventory or runbook file."""

    file: str
    line: int | None
    path: str
    message: str
    loc: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.path:
            return f"{where} {self.path}: {self.message}"
        return f"{where}: {self.message}"


class UnreadableFile(ConfigError):
    """A file that cannot be read as bounded UTF-8 text; ``problem`` says why and where."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem), problems=[str(problem)])
        self.problem = problem


def _line_at(data: bytes | str, offset: int) -> int:
    if isinstance(data, bytes):
        return data.count(b"\n", 0, offset) + 1
    return data.count("\n", 0, offset) + 1


def too_large(filename: str, data: bytes | str, limit: int) -> Problem:
    """The problem of an input longer than ``limit``: reported where the limit falls."""
    return Problem(filename, _line_at(data, limit), "",
                   f"the file is larger than {limit} bytes: refusing to read further "
                   "(an inventory or runbook is far smaller)")


def read_source(path: str | Path, *, max_bytes: int = MAX_BYTES) -> str:
    """The text of ``path``, read no further than ``max_bytes`` (a device or a huge file
    is refused, not read; a FIFO without a writer is empty, not waited for). Raises
    :class:`UnreadableFile`."""
    name = str(path)
    try:
        # non-blocking open: a FIFO nobody writes to reads as empty instead of hanging
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            os.set_blocking(fd, True)
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise UnreadableFile(Problem(name, None, "",
                                     f"cannot read the file: {exc.strerror or exc}")) from None
    if len(data) > max_bytes:
        raise UnreadableFile(too_large(name, data, max_bytes))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(Problem(
            name, _line_at(data, exc.start), "",
            f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
        )) from None


# --------------------------------------------------------------------------------------
# The loader
# --------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML-1.2-ish scalars: only true/false are booleans, no
    sexagesimal numbers (``22:00`` stays a string), no implicit timestamps."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}


for _first_char, _resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        if _tag not in (_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG):
            _Loader.add_implicit_resolver(_tag, _regexp, [_first_char])
_Loader.add_implicit_resolver(
    _BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    _INT_TAG,
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class LimitExceeded(yaml.MarkedYAMLError):
    """The document is nested too deeply or holds too many nodes (aliases expanded)."""


class _BoundedLoader(_Loader):
    """Counts nodes and nesting *while composing*: the limits stop a document before
    PyYAML's recursive composer reaches Python's recursion limit, and before an alias
    bomb is expanded. An alias counts as every node of the tree it names."""

    def __init__(self, stream: str, *, max_nodes: int, max_depth: int) -> None:
        super().__init__(stream)
        self._max_nodes, self._max_depth = max_nodes, max_depth
        self._depth = 0
        self._expanded = 0
        self._weights: dict[str, int] = {}  # anchor -> nodes its tree expands to

    def _count(self, n: int, mark: yaml.Mark) -> None:
        self._expanded += n
        if self._expanded > self._max_nodes:
            raise LimitExceeded(problem=f"the document holds more than {self._max_nodes} "
                                "nodes (aliases expanded)", problem_mark=mark)

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)  # an undefined alias raises here
            # an alias of a tree still being composed (a recursive alias) counts 1;
            # the builder reports it
            self._count(self._weights.get(event.anchor or "", 1), event.start_mark)
            return node
        if self._depth >= self._max_depth:
            raise LimitExceeded(problem=f"nested deeper than {self._max_depth} levels",
                                problem_mark=event.start_mark)
        before = self._expanded
        self._count(1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            self._weights[anchor] = self._expanded - before
        return node


def _syntax_problem(exc: yaml.MarkedYAMLError) -> tuple[int | None, str]:
    """The line to report and the message, naming both of PyYAML's places: where the
    construct started (``context_mark``) and where the parser gave up (``problem_mark``)."""
    problem = exc.problem or "invalid YAML"
    pmark, cmark = exc.problem_mark, exc.context_mark
    where = f" (line {pmark.line + 1}, column {pmark.column + 1})" if pmark is not None else ""
    message = f"{problem}{where}"
    if exc.context:
        started = f" (line {cmark.line + 1})" if cmark is not None else ""
        message = f"{exc.context}{started}: {message}"
    marks = [m for m in (pmark, cmark) if m is not None]
    if cmark is not None and _OPENED.search(exc.context or ""):
        marks = [cmark, *marks]
    return (marks[0].line + 1 if marks else None), f"YAML syntax error: {message}"


def _control_character_problem(exc: yaml.reader.ReaderError, text: str) -> tuple[int, str]:
    code = exc.character if isinstance(exc.character, int) else ord(exc.character)
    name = _CONTROL_NAMES.get(code, f"U+{code:04X}")
    line = _line_at(text, exc.position)
    column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
    return line, (f"unacceptable character {name} (#x{code:02x}) at column {column}: YAML "
                  "allows no control characters other than tab and line breaks")


# --------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------


class Document:
    """A parsed YAML document: plain data, the line of every key and item, problems.

    ``data`` is None when the document could not be read at all (its problem says why).
    """

    def __init__(self, text: str, filename: str, *, max_bytes: int = MAX_BYTES,
                 max_nodes: int = MAX_NODES, max_depth: int = MAX_DEPTH) -> None:
        self.filename = filename
        self.lines: dict[Loc, int] = {(): 1}
        self.problems: list[Problem] = []
        self.data: Any = None
        self._max_nodes = max_nodes
        self._nodes = 0
        if len(text) > max_bytes:
            self.problems.append(too_large(filename, text, max_bytes))
            return
        self._load(text, max_nodes=max_nodes, max_depth=max_depth)

    def _load(self, text: str, *, max_nodes: int, max_depth: int) -> None:
        loader: _BoundedLoader | None = None
        line: int | None
        try:
            # the reader checks every character while the loader is constructed
            loader = _BoundedLoader(text, max_nodes=max_nodes, max_depth=max_depth)
            node = loader.get_single_node()
            if node is None:
                self.problem(1, (), "the file is empty (expected a mapping with version: 1)")
                return
            self.data = self._build(loader, node, (), set())
        except yaml.reader.ReaderError as exc:
            line, message = _control_character_problem(exc, text)
            self.problem(line, (), message)
        except LimitExceeded as exc:
            mark = exc.problem_mark
            self.problem(mark.line + 1 if mark else None, (),
                         f"document too large: {exc.problem}")
        except yaml.MarkedYAMLError as exc:
            line, message = _syntax_problem(exc)
            self.problem(line, (), message)
        except yaml.YAMLError as exc:
            self.problem(1, (), f"YAML error: {exc}")
        except RecursionError:  # a merge key ("<<") naming the mapping it is in
            self.problem(1, (), "the document refers to itself without end "
                                "(a merge key naming its own mapping?)")
        finally:
            if loader is not None:
                loader.dispose()

    def problem(self, line: int | None, loc: Loc, message: str) -> None:
        self.problems.append(Problem(self.filename, line, format_path(loc), message, loc))

    def line_of(self, loc: Loc) -> int | None:
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get(())

    def _scalar(self, loader: _Loader, node: yaml.Node, loc: Loc) -> Any:
        try:
            return loader.construct_object(node, deep=True)
        except (ValueError, TypeError, ArithmeticError):
            # e.g. "!!int abc": PyYAML's constructor fails with a bare ValueError.
            self.problem(node.start_mark.line + 1, loc, f"value does not fit its tag {node.tag}")
            return None

    def _build(self, loader: _Loader, node: yaml.Node, loc: Loc, active: set[int]) -> Any:
        self._nodes += 1
        if self._nodes > self._max_nodes:  # the composer counts first; this is a backstop
            raise LimitExceeded(problem=f"the document holds more than {self._max_nodes} "
                                "nodes (aliases expanded)", problem_mark=node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(loader, node, loc)
        if id(node) in active:
            self.problem(node.start_mark.line + 1, loc, "recursive alias")
            return None
        active = active | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            return self._sequence(loader, node, loc, active)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(loader, node, loc, active)
        return None  # pragma: no cover - PyYAML has no other node kinds

    def _sequence(self, loader: _Loader, node: yaml.SequenceNode, loc: Loc,
                  active: set[int]) -> list[Any]:
        if node.tag != _SEQ_TAG:
            self.problem(node.start_mark.line + 1, loc, "unsupported YAML tag on a list")
        items = []
        for i, child in enumerate(node.value):
            self.lines[(*loc, i)] = child.start_mark.line + 1
            items.append(self._build(loader, child, (*loc, i), active))
        return items

    def _mapping(self, loader: _Loader, node: yaml.MappingNode, loc: Loc,
                 active: set[int]) -> dict[Any, Any]:
        if node.tag != _MAP_TAG:
            self.problem(node.start_mark.line + 1, loc, "unsupported YAML tag on a mapping")
        # Keys written here must be unique; keys merged in with "<<" may be
        # overridden by keys written here.
        explicit: dict[Any, int] = {}
        explicit_nodes: set[int] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self._scalar(loader, key_node, loc)
            line = key_node.start_mark.line + 1
            if key in explicit:
                self.problem(line, (*loc, key),
                             f"duplicate key {key!r} (first defined at line {explicit[key]})")
            else:
                explicit[key] = line
                explicit_nodes.add(id(key_node))
        loader.flatten_mapping(node)
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.problem(key_node.start_mark.line + 1, loc, "mapping keys must be scalars")
                continue
            key = self._scalar(loader, key_node, loc)
            if key in explicit and id(key_node) not in explicit_nodes:
                continue  # merged key overridden, or a later duplicate (reported)
            self.lines[(*loc, key)] = key_node.start_mark.line + 1
            result[key] = self._build(loader, value_node, (*loc, key), active)
        return result
