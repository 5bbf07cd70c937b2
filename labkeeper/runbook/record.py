"""What a runbook run leaves behind (pure): the step records, the markdown record, and
the ``labkeeper runbook show`` description."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from labkeeper.runbook.models import Runbook, Step

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
