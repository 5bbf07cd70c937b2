"""The report of a ``dr_drill`` run: per drill a table artifact ``drill-<kind>-<name>``
(each target's history over runs), a ``labkeeper.drill.passed`` / ``.failed`` event
(and ``labkeeper.drill.objective_breached``), ``labkeeper_drill_*`` metrics; the
markdown artifact ``dr-drill`` with every drill against its objectives.
"""

from __future__ import annotations

import re
import time
from typing import Any

from labkeeper import drill as core
from labkeeper.inventory import Inventory
from labkeeper.run_report import Logger, RunReport, cell, failure_of
from labkeeper.secrets import redact

ICON = {"passed": "✅", "failed": "❌"}


def artifact_key(kind: str, name: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "x"
    short = {"database": "db", "guest": "guest", "repository": "repo", "paths": "paths",
             "pitr": "pitr"}[kind]
    return f"drill-{short}-{slug}"[:100]


def result_of(kind: str, name: str, state: Any) -> core.DrillResult:
    """A drill task's result, also when it failed (carried by its error, or made here)."""
    if state.is_completed():
        return state.result()
    exc = failure_of(state)
    carried = getattr(exc, "result", None)
    if isinstance(carried, core.DrillResult):
        return carried
    result = core.DrillResult(kind, name)
    result.fail(f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name))
    return result


class DrillReport(RunReport):
    """Every drill of the run, reported as it ends; the summary at the end."""

    def __init__(self, inv: Inventory, key: str, logger: Logger) -> None:
        super().__init__(inv, key, logger)
        self.results: list[core.DrillResult] = []

    def add(self, kind: str, name: str, state: Any) -> core.DrillResult:
        result = result_of(kind, name, state)
        self.results.append(result)
        (self.logger.info if result.passed else self.logger.error)(
            "%s %s: %s — %s", result.status.upper(), result.label, result.row()["rto"],
            result.summary())
        for note in result.notes:
            self.logger.info("%s: %s", result.label, redact(note))
        self._emit(result)
        self.table([result.row()], f"DR drill {result.label}: {result.status}",
                   key=artifact_key(kind, name))
        return result

    def _resource(self, result: core.DrillResult) -> dict[str, str]:
        inv = self.inv
        if result.kind == "database":
            rid = f"labkeeper.database.{inv.database_server(result.target)}/{result.target}"
        elif result.kind == "guest":
            rid = f"labkeeper.guest.{inv.guest(result.target).vmid}"
        elif result.kind in ("paths", "pitr"):
            rid = f"labkeeper.{result.kind}.{result.target}"
        else:
            rid = f"labkeeper.repository.{result.target}"
        return self.resource(rid, result.target, **{"labkeeper.drill.kind": result.kind})

    def _emit(self, result: core.DrillResult) -> None:
        resource = self._resource(result)
        payload = dict(result.row().items())
        payload["rpo_s"] = result.rpo_s
        payload["rto_s"] = result.rto_s
        self.emit(f"labkeeper.drill.{'passed' if result.passed else 'failed'}", resource,
                  payload)
        if result.breaches:
            self.emit("labkeeper.drill.objective_breached", resource,
                      {**payload, "breaches": result.breaches})

    def finish(self) -> list[core.DrillResult]:
        """The summary and the metrics; the failed drills."""
        elapsed = self.elapsed
        failed = [r for r in self.results if not r.passed]
        self.summary(summary_markdown(self.inv, self.results, elapsed),
                     f"DR drills of {self.inv.lab.name}: "
                     f"{len(self.results) - len(failed)} passed / {len(failed)} failed",
                     key=self.key)
        now = time.time()
        for r in self.results:
            labels = {"kind": r.kind, "target": r.target}
            self.sample("labkeeper_drill_success", labels, 1 if r.passed else 0)
            self.sample("labkeeper_drill_last_run_timestamp_seconds", labels, now)
            if r.rto_s is not None:
                self.sample("labkeeper_drill_rto_seconds", labels, r.rto_s)
            if r.rpo_s is not None:
                self.sample("labkeeper_drill_rpo_seconds", labels, r.rpo_s)
        self.record_metrics()
        return failed


def summary_markdown(inv: Inventory, results: list[core.DrillResult], elapsed: float) -> str:
    lines = [f"# DR drills of {inv.lab.name}", "",
             f"{len(results)} drill(s) in {elapsed:.1f} s", "",
             "| | drill | target | RPO / objective | RTO / objective | source | verified |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        row = r.row()
        lines.append(f"| {ICON[r.status]} | {r.kind} | {r.target} | {row['rpo']} / "
                     f"{row['rpo objective']} | {row['rto']} / {row['rto objective']} | "
                     f"{r.source} | {row['checks']} |")
    for r in results:
        lines += _details(r)
    return "\n".join(lines)


def _details(r: core.DrillResult) -> list[str]:
    lines = ["", f"## {ICON[r.status]} {r.label}", ""]
    if r.error:
        lines += [f"**Error:** {redact(r.error)}", ""]
    lines += [f"**Objective breached:** {b}" for b in r.breaches]
    if r.breaches:
        lines.append("")
    lines += [f"- {'✅' if c.ok else '❌'} {c.name}: {cell(redact(c.detail))}"
              for c in r.checks]
    if r.kept:
        lines.append(f"- ⚠️ scratch copy kept: {r.kept}")
    lines += [f"- {redact(n)}" for n in r.notes]
    return lines
