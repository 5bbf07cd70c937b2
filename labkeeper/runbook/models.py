"""The runbook file's model: parameters, steps of each kind, compensations (strict
pydantic, so every problem is reported with its field)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from labkeeper.inventory import _Model
from labkeeper.runbook.templating import EXPR, code_arguments

StepId = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
ParamName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
Seconds = Annotated[float, Field(gt=0, le=7 * 86400)]

ParamType = Literal["string", "int", "bool", "database", "guest", "app", "host",
                    "path_set", "vzdump_job", "snapshot", "archive"]
"""Inventory types (``database``, ``guest``, ``app``, ``host``, ``path_set``,
``vzdump_job``) must name something in the inventory; ``snapshot`` is ``latest`` or a
restic snapshot id; ``archive`` is ``latest`` or a vzdump volume id."""

PITR_FLOWS = ("pitr_restore_copy", "pitr_compare_copy", "pitr_swap_copy", "pitr_swap_back",
              "pitr_drop_copy")
"""The steps of runbook pitr-restore-database (``flows/pitr.py``: ``<name>_flow``)."""
FLOWS = ("pg_backup", "path_backup", "vzdump", "update", "provision", "drill",
         "restore_database", "restore_guest", *PITR_FLOWS)
"""The labkeeper flows a ``flow`` step may run (see ``flows/runbook.py``)."""

PROXMOX_OPS = ("start", "stop", "shutdown", "snapshot", "rollback", "tag", "destroy")
DATABASE_OPS = ("swap", "drop")


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
            if EXPR.search(self.argv[i]):
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
        if EXPR.search(self.query):
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
