"""The report of a ``vzdump`` run: a row per guest filled in as its backup, retention
and off-site copy end; then the table ``vzdump``, the markdown ``vzdump-summary``, a
``labkeeper.vzdump.succeeded`` / ``.failed`` event per guest and the
``labkeeper_vzdump_*`` metrics.
"""

from __future__ import annotations

import time
from typing import Any

from labkeeper import vzdump as core
from labkeeper.inventory import Inventory, VzdumpJob
from labkeeper.run_report import Logger, RunReport, cell, failure_of, warnings_section
from labkeeper.secrets import redact

ADHOC_RETENTION = ("ad-hoc run (no job): retention is not applied — no archive is pruned; "
                   "run a job to apply its retention policy")
GOOD = ("ok", "warning", "skipped")
ICON = {"ok": "✅", "warning": "⚠️", "skipped": "↩️", "failed": "❌"}


def _state_error(state: Any) -> str:
    exc = failure_of(state)
    return redact(f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name))


class VzdumpReport(RunReport):
    """The rows of one run of ``job``, keyed by vmid."""

    def __init__(self, inv: Inventory, key: str, logger: Logger, job: VzdumpJob,
                 resolved: core.Resolved, *, adhoc: bool, started: float | None = None
                 ) -> None:
        super().__init__(inv, key, logger, started=started)
        self.job, self.resolved, self.adhoc = job, resolved, adhoc
        self.rows: dict[int, core.Row] = {}
        for t in resolved.targets:
            self.rows[t.vmid] = core.Row(t.name or str(t.vmid), t.vmid, t.node)
        for vmid in resolved.missing:
            self.rows[vmid] = core.Row(str(vmid), vmid, "-", status="failed",
                                       detail="selected but not in the cluster")
        self.warnings = list(resolved.warnings) + ([ADHOC_RETENTION] if adhoc else [])
        for w in self.warnings:
            logger.warning("vzdump %s: %s", job.name, w)

    def backup_ended(self, target: core.Target, attempt: int, outcome: Any,
                     retry: bool) -> core.GuestBackup | None:
        """Record a guest's backup task run (``outcome``: its future, or the error that
        kept it from starting): the good or locked backup, or None (failed). A locked
        guest stays pending when ``retry``, else fails."""
        row = self.rows[target.vmid]
        if isinstance(outcome, Exception):
            row.status, row.detail = "failed", redact(f"{type(outcome).__name__}: {outcome}")
            return None
        outcome.wait()  # done already; this records its final state on the future
        state = outcome.state
        if not state.is_completed():
            row.status, row.detail = "failed", _state_error(state)
            return None
        res: core.GuestBackup = state.result()
        row.node = res.node
        if res.status == "locked":
            if retry:
                row.status, row.detail = "pending", f"try {attempt}: {res.detail}"
            else:
                row.status = "failed"
                row.detail = f"still {res.detail} after {attempt} tries"
            return res
        row.status, row.archive, row.size = res.status, res.volid, res.size
        row.duration_s, row.detail = res.duration, res.detail
        if self.adhoc:
            row.pruned = "skipped (ad-hoc run)"
        return res

    def after_backup_ended(self, vmid: int, kind: str, fut: Any) -> None:
        """Record a guest's ``retention`` or ``offsite`` task run."""
        fut.wait()
        row = self.rows[vmid]
        state = fut.state
        if not state.is_completed():
            setattr(row, "pruned" if kind == "retention" else "offsite", "failed")
            row.status = "failed"
            row.detail = f"{row.detail}; {kind}: {_state_error(state)}".strip("; ")
        elif kind == "retention":
            r: core.RetentionResult = fut.result()
            row.pruned = len(r.remove) if not r.dry_run else f"{len(r.remove)} (dry run)"
        else:
            row.offsite = fut.result().text()

    def finish(self) -> tuple[list[dict[str, Any]], list[core.Row]]:
        """Publish everything; the table and the failed rows."""
        rows = self.rows.values()
        if self.job.offsite is None:
            for row in rows:
                row.offsite = "-"
        table = [r.as_dict() for r in sorted(rows, key=lambda r: (r.node, r.vmid))]
        failed = [r for r in rows if r.status not in GOOD]
        elapsed = self.elapsed
        if not table:
            table = [{"guest": "-", "vmid": 0, "node": "-", "archive": "", "size": 0,
                      "duration s": 0, "status": "warning", "pruned": "", "offsite": "",
                      "detail": "; ".join(self.resolved.warnings)}]
        self.table(table, self._description(len(failed)))
        self.summary(summary(self.job, table, tuple(self.warnings), elapsed,
                             adhoc=self.adhoc))
        for r in rows:
            self._emit(r)
        self._record(rows)
        for r in sorted(rows, key=lambda r: r.vmid):
            log = self.logger.error if r in failed else self.logger.info
            log("%-6s %-16s %-5s %-8s %s %s", r.vmid, r.guest[:16], r.node, r.status,
                r.archive, redact(r.detail))
        return table, failed

    def _description(self, failed: int) -> str:
        counts = {s: sum(1 for r in self.rows.values() if r.status == s) for s in GOOD}
        text = (f"vzdump {self.job.name}: {counts['ok']} ok / {counts['warning']} with "
                f"warnings / {counts['skipped']} already done / {failed} failed")
        return text + ("; retention not applied (ad-hoc run)" if self.adhoc else "")

    def _emit(self, row: core.Row) -> None:
        ok = row.status in GOOD
        self.emit(f"labkeeper.vzdump.{'succeeded' if ok else 'failed'}",
                  self.resource(f"labkeeper.guest.{row.vmid}", row.guest),
                  {"job": self.job.name, **row.as_dict()})

    def _record(self, rows: Any) -> None:
        now = time.time()
        for r in rows:
            labels = {"job": self.job.name, "guest": r.guest, "vmid": str(r.vmid)}
            ok = r.status in GOOD
            self.sample("labkeeper_vzdump_success", labels, 1 if ok else 0)
            if ok and r.status != "skipped":
                self.sample("labkeeper_vzdump_last_success_timestamp_seconds", labels, now)
            if ok:
                self.sample("labkeeper_vzdump_archive_bytes", labels, r.size)
        self.record_metrics()


def summary(job: VzdumpJob, table: list[dict], warnings: tuple[str, ...],
            elapsed: float, *, adhoc: bool = False) -> str:
    retention = ("**not applied** (ad-hoc run)" if adhoc
                 else f"`{job.retention.as_pve()}`")
    lines = [f"# vzdump {job.name}", "",
             f"{len(table)} guest(s) in {elapsed:.1f} s — storage `{job.storage}`, mode "
             f"{job.mode}, retention {retention}", "",
             "| | guest | vmid | node | archive | size | s | pruned | offsite | detail |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {ICON.get(r['status'], '')} | {r['guest']} | {r['vmid']} | "
                     f"{r['node']} | {r['archive']} | {r['size']} | {r['duration s']} | "
                     f"{r['pruned']} | {r['offsite']} | {cell(r['detail'])} |")
    return "\n".join(lines + warnings_section(warnings))
