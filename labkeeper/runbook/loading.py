"""Finding and loading runbook files, with file:line errors for every problem (including
a ``{{ expr }}`` that names nothing)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from labkeeper.errors import ConfigError
from labkeeper.inventory import Problem, _schema_problems, format_path, problems_report
from labkeeper.runbook.models import Runbook, Step
from labkeeper.runbook.params import DERIVED
from labkeeper.runbook.templating import expressions
from labkeeper.yaml_loader import Document, UnreadableFile, read_source

RUNBOOK_DIR = Path(__file__).resolve().parents[2] / "runbooks"


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
