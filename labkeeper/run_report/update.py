"""The report of an ``update-app`` run: the table ``update``, the markdown
``update-summary`` (versions and image digests before / attempted / after), a
``labkeeper.update.<outcome>`` event per app and the ``labkeeper_update_*`` metrics.
"""

from __future__ import annotations

import time

from labkeeper import update as core
from labkeeper.run_report import RunReport, cell
from labkeeper.secrets import redact

EVENT = {"updated": "succeeded", "recovered": "succeeded", "current": "succeeded",
         "rolled-back": "rolled_back", "failed": "failed", "blocked": "blocked",
         "held": "held", "stale": "stale"}
"""Status → event name (anything else: ``skipped``)."""
ICON = {"updated": "✅", "recovered": "♻️", "rolled-back": "↩️", "failed": "❌",
        "skipped": "⏭️", "dry-run": "📝", "current": "✅", "blocked": "⛔", "held": "📌",
        "stale": "⚠️"}


class UpdateReport(RunReport):
    def finish(self, results: list[core.AppResult], dry_run: bool) -> None:
        """Artifacts; unless a dry run, events and metrics."""
        counts: dict[str, int] = {}
        for r in results:
            counts[r.status] = counts.get(r.status, 0) + 1
        description = "update: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        self.table([r.row() for r in results], description)
        self.summary(summary(results), description)
        if dry_run:
            return
        for r in results:
            self.emit(f"labkeeper.update.{EVENT.get(r.status, 'skipped')}",
                      self.resource(f"labkeeper.app.{r.app}", r.app), r.row())
        now = time.time()
        for r in results:
            if r.status != "skipped":
                self._samples(r, now)
        self.record_metrics()

    def _samples(self, r: core.AppResult, now: float) -> None:
        labels = {"app": r.app}
        self.sample("labkeeper_update_success", labels,
                    1 if r.status in ("updated", "recovered", "current") else 0)
        self.sample("labkeeper_update_rolled_back", labels, 1 if r.status == "rolled-back" else 0)
        for status in core.NOT_DONE:
            self.sample(f"labkeeper_update_{status}", labels, 1 if r.status == status else 0)
        self.sample("labkeeper_update_last_run_timestamp_seconds", labels, now)


def summary(results: list[core.AppResult]) -> str:
    lines = ["# Application updates", "",
             "| | app | status | protection | before | attempted | after | detail |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        cells = [ICON.get(r.status, ""), r.app, r.status, r.protection or "-",
                 core.fmt_versions(r.before), core.fmt_versions(r.attempted),
                 core.fmt_versions(r.after), redact(r.detail)]
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    for r in results:
        if r.plan:
            lines += ["", f"## {r.app}: commands", ""] + [f"    {p}" for p in r.plan]
        if r.removed:
            lines += ["", f"{r.app}: removed {', '.join(r.removed)}"]
        lines += _digest_lines(r)
        if r.timings:
            lines += ["", f"{r.app}: seconds " + ", ".join(
                f"{k} {v:.2f}" for k, v in r.timings.items())]
    return "\n".join(lines)


def _digest_lines(r: core.AppResult) -> list[str]:
    """The registry digests per service: before, offered by the registry, after."""
    if not r.digests:
        return []
    services = sorted({svc for d in r.digests.values() for svc in d})
    cols = list(r.digests)
    lines = ["", f"## {r.app}: image digests", "", "| service | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for svc in services:
        lines.append(f"| {svc} | " + " | ".join(r.digests[c].get(svc, "-") or "-"
                                                   for c in cols) + " |")
    return lines
