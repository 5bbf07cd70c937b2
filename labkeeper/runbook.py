"""Runbooks: versioned YAML checklists that run themselves (models, loading, templating,
dry-run planning, the rendered record). Nothing here changes the lab: the steps are
executed by ``labkeeper/runbook_ops.py`` and orchestrated by ``flows/runbook.py``.

A runbook file (``runbooks/<name>.yaml``)::

    version: 1
    name: restore-database
    description: ...
    params:
      database: {type: database, description: The database to restore}
      snapshot: {type: snapshot, default: latest}
    steps:
      - id: restore
        title: Restore {{ database }} into a new database
        flow: {name: restore_database, with: {database: "{{ database }}"}}
      - id: ask
        approval: {message: Swap it in place of {{ database }}?}
      - id: swap
        database: {op: swap, database: "{{ database }}", restored: "{{ steps.restore.restored }}"}
        on_failure: {compensate: [drop-restored]}
    compensations:
      - id: drop-restored
        database: {op: drop, database: "{{ database }}", name: "{{ steps.restore.restored }}"}

Each step has exactly one kind key: ``flow`` (a labkeeper flow as a subflow), ``ssh``
(an argv on an inventory host or guest), ``proxmox`` (an operation through the
adapter), ``database`` (swap or drop restored databases), ``check`` (health probes,
a SQL query, a guest's status), ``note`` and ``approval``.

Templating is data, never text for a shell: ``{{ expr }}`` inside a string is
replaced by the value; a string that is exactly one ``{{ expr }}`` takes the value
with its type (a list stays a list). Each argv element stays one argument whatever
it contains. ``expr`` is a parameter name, ``run.id`` / ``run.stamp``, or
``steps.<id>.<output>``; every parameter of an inventory type also gives derived
values (``<param>_vmid``, ``<param>_node``, ``<param>_databases``, ``<param>_apps``
for a guest; ``<param>_guest`` for an app or a database on a guest; ``<param>_tag``
and ``<param>_storage`` for a vzdump job).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from labkeeper.errors import ConfigError, PermanentError
from labkeeper.inventory import (
    Inventory,
    Problem,
    _did_you_mean,
    _Model,
    _schema_problems,
    format_path,
    problems_report,
)
from labkeeper.yaml_loader import Document, UnreadableFile, read_source

RUNBOOK_DIR = Path(__file__).resolve().parents[1] / "runbooks"

StepId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
ParamName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
Seconds = Annotated[float, Field(gt=0, le=7 * 86400)]

ParamType = Literal["string", "int", "bool", "database", "guest", "app", "host",
                    "path_set", "vzdump_job", "snapshot", "archive"]
"""Inventory types (``database``, ``guest``, ``app``, ``host``, ``path_set``,
``vzdump_job``) must name something in the inventory; ``snapshot`` is ``latest`` or a
restic snapshot id; ``archive`` is ``latest`` or a vzdump volume id."""

FLOWS = ("pg_backup", "path_backup", "vzdump", "update", "provision", "drill",
         "restore_database", "restore_guest")
"""The labkeeper flows a ``flow`` step may run (see ``flows/runbook.py``)."""

PROXMOX_OPS = ("start", "stop", "shutdown", "snapshot", "rollback", "tag", "destroy")
DATABASE_OPS = ("swap", "drop")


# =====================================================================================
# the model
# =====================================================================================


class Param(_Model):
    """A runbook parameter: typed, validated before any step runs."""

    type: ParamType = "string"
    description: str = ""
    default: Any = None
    """No default: the parameter is required."""
    multiple: bool = False
    """A list of values (each of ``type``)."""
    choices: list[str] | None = None
    pattern: str | None = None
    """For ``string``: a regular expression the whole value must match."""

    @model_validator(mode="after")
    def _check(self) -> Param:
        if self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"pattern is not a regular expression: {exc}") from None
        return self

    @property
    def required(self) -> bool:
        return self.default is None


class FlowStep(_Model):
    name: Literal[FLOWS]  # type: ignore[valid-type]
    with_: Annotated[dict[str, Any], Field(alias="with")] = {}
    """The flow's parameters (templated)."""


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


class SshStep(_Model):
    host: str
    """An inventory host or a guest with an ``ssh`` section (templated)."""
    argv: Annotated[list[str], Field(min_length=1)]
    """The command, one element per argument (templated per element: a value never
    splits into several arguments and never meets a shell unquoted). Code arguments
    (the script of ``sh -c``, ``python -c``, ``psql -c`` ...) take no ``{{ }}``: pass
    values as positional arguments (``[sh, -c, 'echo "$1"', sh, "{{ name }}"]``)."""
    expect_exit: list[int] = [0]

    @model_validator(mode="after")
    def _no_templated_code(self) -> SshStep:
        for i in code_arguments(self.argv):
            if _EXPR.search(self.argv[i]):
                raise ValueError(
                    f"argv[{i}] is code (what {self.argv[i - 1]} runs) and holds a {{{{ }}}} "
                    "template: a value would be pasted into it as text. Pass it as a "
                    "positional argument instead, e.g. [sh, -c, 'echo \"$1\"', sh, "
                    "\"{{ name }}\"]")
        return self


class ProxmoxStep(_Model):
    op: Literal[PROXMOX_OPS]  # type: ignore[valid-type]
    guest: Any = None
    """A guest name, or a list of names (``start``/``shutdown``/``stop`` order a list by
    ``depends_on``: dependencies start first and stop last)."""
    app: str | None = None
    """Instead of ``guest``: the guest of this app."""
    snapshot: str | None = None
    """``snapshot``: the name to create; ``rollback``: a name or ``latest-pre-update``."""
    tag: str | None = None
    """``tag``: the tag to add to the guest (e.g. one a vzdump job selects)."""

    @model_validator(mode="after")
    def _target(self) -> ProxmoxStep:
        if (self.guest is None) == (self.app is None):
            raise ValueError("set exactly one of guest, app")
        if self.op == "tag" and not self.tag:
            raise ValueError("op tag needs tag")
        if self.op == "rollback" and not self.snapshot:
            raise ValueError("op rollback needs snapshot (a name or latest-pre-update)")
        return self


class DatabaseStep(_Model):
    op: Literal[DATABASE_OPS]  # type: ignore[valid-type]
    database: str
    """The inventory database."""
    restored: str | None = None
    """``swap``: the restored database to put in its place."""
    name: str | None = None
    """``drop``: a database labkeeper restored or set aside (nothing else is ever dropped)."""

    @model_validator(mode="after")
    def _need(self) -> DatabaseStep:
        if self.op == "swap" and not self.restored:
            raise ValueError("op swap needs restored")
        if self.op == "drop" and not self.name:
            raise ValueError("op drop needs name")
        return self


class SqlCheck(_Model):
    database: str
    query: str
    """Plain SQL, no ``{{ }}``: a value pasted into SQL as text could change the
    statement (``'; DROP ...``); the database is chosen by ``database`` instead."""
    min: float | None = None
    max: float | None = None
    equals: str | None = None

    @model_validator(mode="after")
    def _no_templated_sql(self) -> SqlCheck:
        if _EXPR.search(self.query):
            raise ValueError("sql.query holds a {{ }} template: values are never pasted "
                             "into SQL as text; write the query without it (the database "
                             "comes from sql.database, which may be templated)")
        return self


class CheckStep(_Model):
    health: Any = None
    """An app name, a list of names, or ``all``: every probe must pass (with the
    app's health gate: retried until its deadline)."""
    sql: SqlCheck | None = None
    guest_running: Any = None
    """A guest name or list: each must be running."""

    @model_validator(mode="after")
    def _one(self) -> CheckStep:
        given = [n for n in ("health", "sql", "guest_running") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("a check needs exactly one of health, sql, guest_running")
        return self


class Approval(_Model):
    message: str
    timeout: Seconds = 3600


class Compensate(_Model):
    compensate: Annotated[list[StepId], Field(min_length=1)]


KINDS = ("flow", "ssh", "proxmox", "database", "check", "note", "approval")


class Step(_Model):
    """One step: exactly one kind key, plus common settings."""

    id: StepId
    title: str | None = None
    when: Any = None
    """Run only when this (templated) value is truthy; otherwise the step is skipped."""
    unless: Any = None
    """Skip the step when this (templated) value is truthy."""
    on_failure: Literal["abort", "continue"] | Compensate = "abort"
    timeout: Seconds | None = None
    flow: FlowStep | None = None
    ssh: SshStep | None = None
    proxmox: ProxmoxStep | None = None
    database: DatabaseStep | None = None
    check: CheckStep | None = None
    note: str | None = None
    approval: Approval | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a step needs exactly one of {', '.join(KINDS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def spec(self) -> Any:
        return getattr(self, self.kind)


class Runbook(_Model):
    """A runbook file."""

    version: Literal[1]
    name: StepId
    description: str
    params: dict[ParamName, Param] = {}
    steps: Annotated[list[Step], Field(min_length=1)]
    compensations: list[Step] = []
    """Steps run only when a step's ``on_failure: {compensate: [ids]}`` names them."""

    @model_validator(mode="after")
    def _refs(self) -> Runbook:
        ids = [s.id for s in self.steps] + [s.id for s in self.compensations]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"step ids must be unique: {', '.join(dup)}")
        comp = {s.id for s in self.compensations}
        for s in self.steps:
            if isinstance(s.on_failure, Compensate):
                missing = [c for c in s.on_failure.compensate if c not in comp]
                if missing:
                    raise ValueError(f"step {s.id}: on_failure names unknown compensation "
                                     f"step(s) {', '.join(missing)} (declared: "
                                     f"{', '.join(sorted(comp)) or 'none'})")
        for s in self.compensations:
            if s.approval is not None:
                raise ValueError(f"compensation {s.id}: an approval cannot compensate")
        return self

    def compensation(self, step_id: str) -> Step:
        return next(s for s in self.compensations if s.id == step_id)


# =====================================================================================
# loading (file:line errors)
# =====================================================================================


def parse_runbook(text: str, filename: str = "<runbook>") -> Runbook:
    """Parse and validate a runbook; :class:`ConfigError` lists every problem with
    file, line and field."""
    doc = Document(text, filename)
    problems: list[Problem] = list(doc.problems)
    book: Runbook | None = None
    if not problems:
        if not isinstance(doc.data, dict):
            problems.append(Problem(filename, 1, "", "a runbook is a mapping (version: 1, "
                                                     "name: ..., steps: [...])"))
        else:
            ctx: dict[str, Any] = {}
            try:
                book = Runbook.model_validate(doc.data, context=ctx)
            except ValidationError as exc:
                problems += _schema_problems(exc, doc, ctx)
    if book is not None:
        problems += _template_problems(book, doc)
    if problems or book is None:
        raise ConfigError(problems_report(problems, source=filename),
                          problems=[str(p) for p in problems])
    return book


def load_runbook(path: str | Path) -> Runbook:
    path = Path(path)
    try:
        text = read_source(path)
    except UnreadableFile as exc:
        raise ConfigError(f"{path}: cannot read the runbook",
                          problems=[str(exc.problem)]) from None
    book = parse_runbook(text, str(path))
    if book.name != path.stem:
        raise ConfigError(f"{path}: name {book.name!r} must equal the file name "
                          f"({path.stem!r})", [f"{path}:1 name: must be {path.stem!r}"])
    return book


def runbook_dir() -> Path:
    """``$LABKEEPER_RUNBOOKS`` (your own runbooks), else the repository's ``runbooks/``."""
    env = os.environ.get("LABKEEPER_RUNBOOKS")
    return Path(env) if env else RUNBOOK_DIR


def runbook_files(directory: Path | None = None) -> dict[str, Path]:
    directory = directory or runbook_dir()
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def find_runbook(name: str, directory: Path | None = None) -> Runbook:
    directory = directory or runbook_dir()
    files = runbook_files(directory)
    if name not in files:
        raise ConfigError(f"no runbook {name!r} in {directory} (known: "
                          f"{', '.join(files) or 'none'})")
    return load_runbook(files[name])


# =====================================================================================
# templating (pure)
# =====================================================================================

_EXPR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")


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
        whole = _EXPR.fullmatch(value.strip())
        if whole:
            return lookup(ctx, whole.group(1))
        return _EXPR.sub(lambda m: _text(lookup(ctx, m.group(1))), value)
    if isinstance(value, list):
        return [render(v, ctx) for v in value]
    if isinstance(value, dict):
        return {k: render(v, ctx) for k, v in value.items()}
    return value


def render_argv(argv: Sequence[str], ctx: Mapping[str, Any]) -> tuple[str, ...]:
    """An argv with each element rendered to exactly one string argument. A code
    argument (:func:`code_arguments`) with a template is refused, never rendered."""
    for i in code_arguments(argv):
        if _EXPR.search(argv[i]):
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
        yield from (m.group(1) for m in _EXPR.finditer(value))
    elif isinstance(value, list):
        for v in value:
            yield from expressions(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from expressions(v)


DERIVED = {
    "guest": ("vmid", "node", "databases", "apps"),
    "app": ("guest",),
    "database": ("guest",),
    "vzdump_job": ("tag", "storage"),
}


def _template_problems(book: Runbook, doc: Document) -> list[Problem]:
    """Every ``{{ expr }}`` must name a parameter, a derived value, run.*, or an earlier
    step (compensations may name any main step)."""
    names = set(book.params)
    for pname, p in book.params.items():
        names |= {f"{pname}_{d}" for d in DERIVED.get(p.type, ())}
    out = []

    def check(step: Step, earlier: set[str], where: tuple[str | int, ...]) -> None:
        raw = step.model_dump(by_alias=True, exclude={"id", "on_failure", "timeout"})
        for expr in expressions(raw):
            head, _, rest = expr.partition(".")
            ok = (expr in names or (head == "run" and rest in ("id", "stamp"))
                  or (head == "steps" and rest.split(".")[0] in earlier))
            if not ok:
                loc = where
                out.append(Problem(doc.filename, doc.line_of(loc), format_path(loc),
                                   f"{{{{ {expr} }}}} names nothing: not a parameter "
                                   f"({', '.join(sorted(names)) or 'none'}), run.id, run.stamp "
                                   "or steps.<earlier step>.<output>"))

    earlier: set[str] = set()
    for i, s in enumerate(book.steps):
        check(s, earlier, ("steps", i))
        earlier.add(s.id)
    for i, s in enumerate(book.compensations):
        check(s, earlier, ("compensations", i))
    return out


# =====================================================================================
# parameters (validated against the inventory)
# =====================================================================================

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
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: {raw!r} is not an integer")
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {raw!r} is not an integer") from None
    if p.type == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("true", "yes", "1", "on"):
            return True
        if text in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: {raw!r} is not true or false")
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


# =====================================================================================
# ordering guests by depends_on (pure)
# =====================================================================================


def start_order(inv: Inventory, names: Sequence[str]) -> list[str]:
    """``names`` ordered so each guest starts after the guests it depends on (among
    ``names``; stable otherwise). Stop order is the reverse."""
    chosen = list(dict.fromkeys(names))
    deps = {n: [d for d in (inv.guest(n).depends_on or []) if d in chosen] for n in chosen}
    out: list[str] = []
    seen: set[str] = set()

    def visit(n: str, path: tuple[str, ...]) -> None:
        if n in seen:
            return
        if n in path:
            raise ConfigError(f"guests depend on each other in a cycle: {' -> '.join((*path, n))}")
        for d in deps[n]:
            visit(d, (*path, n))
        seen.add(n)
        out.append(n)

    for n in chosen:
        visit(n, ())
    return out


# =====================================================================================
# the record (pure)
# =====================================================================================

Status = Literal["pending", "ok", "failed", "skipped", "rejected", "planned", "compensated"]


@dataclass
class StepRecord:
    id: str
    kind: str
    title: str
    status: Status = "pending"
    detail: str = ""
    seconds: float | None = None
    outputs: dict[str, Any] = field(default_factory=dict)
    compensation: bool = False

    def row(self) -> dict[str, Any]:
        return {"step": self.id, "kind": self.kind, "title": self.title, "status": self.status,
                "seconds": None if self.seconds is None else round(self.seconds, 2),
                "detail": self.detail}


def default_title(step: Step) -> str:
    s = step.spec
    if step.kind == "flow":
        return f"run flow {s.name}"
    if step.kind == "ssh":
        return f"on {s.host}: {' '.join(s.argv)}"
    if step.kind == "proxmox":
        return f"proxmox {s.op} {s.guest if s.guest is not None else 'app ' + str(s.app)}"
    if step.kind == "database":
        return f"database {s.op} {s.database}"
    if step.kind == "check":
        which = next(k for k in ("health", "sql", "guest_running") if getattr(s, k) is not None)
        return f"check {which}"
    if step.kind == "note":
        return "note"
    return "approval"


def record_markdown(book: Runbook, values: Mapping[str, Any], records: Sequence[StepRecord],
                    *, outcome: str, dry_run: bool, elapsed: float) -> str:
    icon = {"ok": "✅", "failed": "❌", "skipped": "·", "rejected": "⛔", "planned": "📝",
            "pending": "…", "compensated": "↩️"}
    head = f"# Runbook `{book.name}`" + (" (dry run)" if dry_run else "")
    lines = [head, "", book.description.strip(), "", f"**Outcome:** {outcome} in {elapsed:.1f} s",
             "", "## Parameters", ""]
    if values:
        lines += [f"- `{k}` = `{v}`" for k, v in values.items()]
    else:
        lines.append("(none)")
    lines += ["", "## Steps", "", "| | step | kind | what | time | detail |",
              "|---|---|---|---|---|---|"]
    for r in records:
        t = "-" if r.seconds is None else f"{r.seconds:.1f} s"
        name = f"{r.id} (compensation)" if r.compensation else r.id
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        title = r.title.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {icon[r.status]} | {name} | {r.kind} | {title} | {t} | {detail} |")
    return "\n".join(lines)


def describe(book: Runbook) -> str:
    """``labkeeper runbook show``: what the runbook does and takes."""
    lines = [f"{book.name}: {book.description.strip()}", "", "parameters:"]
    for n, p in book.params.items():
        extra = "required" if p.required else f"default {p.default!r}"
        lines.append(f"  {n} ({p.type}{', list' if p.multiple else ''}; {extra})"
                     + (f": {p.description}" if p.description else ""))
    if not book.params:
        lines.append("  (none)")
    lines += ["", "steps:"]
    for i, s in enumerate(book.steps, 1):
        fail = s.on_failure if isinstance(s.on_failure, str) else \
            "compensate " + ", ".join(s.on_failure.compensate)
        when = (f" [when {s.when}]" if s.when is not None else "") + \
            (f" [unless {s.unless}]" if s.unless is not None else "")
        lines.append(f"  {i}. {s.id} ({s.kind}, on failure: {fail}){when}: "
                     f"{s.title or default_title(s)}")
    if book.compensations:
        lines += ["", "compensations:"]
        lines += [f"  - {s.id} ({s.kind}): {s.title or default_title(s)}"
                  for s in book.compensations]
    return "\n".join(lines)
