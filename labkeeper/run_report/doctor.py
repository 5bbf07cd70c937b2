"""The report of a ``doctor`` run: the table ``doctor`` and the ``doctor-summary``."""

from __future__ import annotations

from labkeeper import doctor
from labkeeper.run_report import RunReport, cell

ICON = {"ok": "✅", "warn": "⚠️", "fail": "❌", "skip": "·"}


class DoctorReport(RunReport):
    """The artifacts and log lines of the checks' results."""

    def finish(self, rows: list[doctor.CheckResult]) -> list[doctor.CheckResult]:
        """Publish; the failed checks."""
        failed = [r for r in rows if r.status == "fail"]
        self.table([r.row() for r in rows], f"labkeeper doctor: {len(rows) - len(failed)} "
                                            f"ok / {len(failed)} failed")
        self.summary(summary(rows, self.elapsed))
        for r in rows:
            log = self.logger.error if r.status == "fail" else self.logger.info
            log("%-10s %-20s %-4s %6d ms  %s", r.check, r.target, r.status, r.latency_ms,
                r.detail)
        return failed


def summary(rows: list[doctor.CheckResult], elapsed: float) -> str:
    lines = ["# labkeeper doctor", "", f"{len(rows)} checks in {elapsed:.1f} s", "",
             "| | check | target | latency | detail |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {ICON[r.status]} | {r.check} | {r.target} | {r.latency_ms} ms "
                     f"| {cell(r.detail)} |")
    return "\n".join(lines)
