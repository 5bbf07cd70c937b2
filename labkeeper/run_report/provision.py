"""The report of a ``provision`` run: the plan (markdown ``provision-plan``), then the
table ``provision`` of every step and the markdown ``provision-summary`` with the plan
that remains after applying.
"""

from __future__ import annotations

from labkeeper import provision as pv
from labkeeper.run_report import RunReport, cell
from labkeeper.secrets import redact

ICON = {"changed": "✏️", "unchanged": "·", "ok": "✅", "held": "⏸️", "skipped": "·",
        "failed": "❌", "cleanup": "🧹"}


class ProvisionReport(RunReport):
    def plan(self, plan: pv.Plan, key: str) -> None:
        """The plan as a markdown artifact and the first lines of the log."""
        self.summary(plan.markdown(), plan.headline(), key=key)
        self.logger.info(plan.headline())
        for row in plan.rows():
            if row["action"] not in ("leave", "absent"):
                self.logger.info("%-16s %6s %-4s %-5s %-9s %s", row["guest"], row["vmid"],
                                 row["type"], row["node"], row["action"], row["details"])
        for problem in plan.problems:
            self.logger.error("plan problem: %s", problem)

    def applied(self, report: pv.ApplyReport, after: pv.Plan, seconds: float) -> None:
        """Every step, and the plan after applying."""
        self.table(report.rows(), report.summary())
        self.summary(summary(report, after, seconds))
        for r in report.results:
            log = self.logger.error if r.status == "failed" else self.logger.info
            log("%-16s %-10s %-9s %s", r.guest, r.step, r.status, redact(r.detail))
        self.logger.info("after apply: %s", after.headline())


def summary(report: pv.ApplyReport, after: pv.Plan, seconds: float) -> str:
    lines = [f"# Provisioning — {report.plan.lab}", "", f"{report.summary()} in {seconds:.1f} s",
             "", "| | guest | step | status | detail |", "|---|---|---|---|---|"]
    for r in report.results:
        lines.append(f"| {ICON.get(r.status, '')} | {r.guest} | {r.step} | {r.status} | "
                     f"{cell(redact(r.detail))} |")
    if report.left_for_cleanup:
        lines += ["", "## Left for cleanup", *(f"- {g}" for g in report.left_for_cleanup)]
    lines += ["", "## Plan after apply", "", after.headline()]
    for g in after.guests:
        if g.touches or g.problems:
            lines.append(f"- {g.name} ({g.vmid}): {g.action} — {g.summary()}")
    return "\n".join(lines)
