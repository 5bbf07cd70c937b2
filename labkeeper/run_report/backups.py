"""The report of a backup run (``pg_backup``, ``path_backup``): a row, metrics and a
``labkeeper.backup.succeeded`` / ``.failed`` event per database or path set, a table
artifact, and the markdown summary.
"""

from __future__ import annotations

import json
import time
from typing import Any

from labkeeper import path_backup, pg_backup
from labkeeper.inventory import Inventory
from labkeeper.run_report import Logger, RunReport, cell, failure_of, state_error, warnings_section
from labkeeper.secrets import redact

ICON = {"ok": "✅", "warning": "⚠️", "failed": "❌"}


class BackupReport(RunReport):
    """Rows, failures and warnings of a backup run; backup metrics per series."""

    def __init__(self, inv: Inventory, key: str, logger: Logger) -> None:
        super().__init__(inv, key, logger)
        self.rows: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self.warnings: list[str] = []

    def _ran(self, series: dict[str, str], ok: bool) -> None:
        self.sample("labkeeper_backup_last_run_timestamp_seconds", series, time.time())
        self.sample("labkeeper_backup_success", series, 1 if ok else 0)

    def succeeded(self, resource: dict[str, str], series: dict[str, str],
                  row: dict[str, Any], payload: dict[str, Any], *, duration: float,
                  dumped: float, added: float) -> None:
        self._ran(series, True)
        self.sample("labkeeper_backup_last_success_timestamp_seconds", series, time.time())
        self.sample("labkeeper_backup_duration_seconds", series, duration)
        self.sample("labkeeper_backup_dumped_bytes", series, dumped)
        self.sample("labkeeper_backup_added_bytes", series, added)
        self.rows.append(row)
        self.emit("labkeeper.backup.succeeded", resource, payload)

    def failed_one(self, resource: dict[str, str], series: dict[str, str], label: str,
                   row: dict[str, Any], detail: str) -> None:
        self._ran(series, False)
        self.logger.error("%s: %s", label, redact(detail))
        self.failed.append(label)
        self.rows.append(row)
        self.emit("labkeeper.backup.failed", resource, {"error": redact(detail)[:2000]})


# ====================================================================== pg_backup


def pg_failed_row(name: str, detail: str) -> dict[str, Any]:
    return {"database": name, "status": "failed", "snapshot": "", "bytes dumped": 0,
            "bytes added (uncompressed)": 0, "duration s": 0, "throughput MB/s": 0,
            "tables": 0, "backup id": "", "notes": redact(detail)}


class PgBackupReport(BackupReport):
    """The ``pg-backup`` artifacts of a ``pg_backup`` run."""

    def globals_done(self, label: str, state: Any) -> None:
        """A server's globals: a failure is a warning (the databases still count)."""
        if state.is_completed():
            g: pg_backup.GlobalsResult = state.result()
            self.rows.append(g.row())
            if g.status != "ok":
                self.warnings.append(f"globals {label}: {g.detail}")
            return
        detail = f"globals NOT backed up: {failure_of(state)}"
        self.warnings.append(f"globals {label}: {detail}")
        self.logger.warning("globals of %s: %s", label, detail)
        self.rows.append({**pg_failed_row(f"globals {label}", detail), "status": "warning"})

    def database_done(self, name: str, state: Any) -> None:
        server = self.inv.database_server(self.inv.database(name))
        resource = self.resource(f"labkeeper.database.{server}/{name}", name)
        series = {"series": f"db:{self.inv.database_server(name)}/{name}", "kind": "pg_dump"}
        if not state.is_completed():
            detail = state_error(state)
            self.failed_one(resource, series, name, pg_failed_row(name, detail), detail)
            return
        res: pg_backup.BackupResult = state.result()
        self.succeeded(resource, series, res.row(),
                       {"snapshot_id": res.snapshot_id, "backup_id": res.backup_id,
                        "bytes_dumped": res.bytes_dumped,
                        "duration_s": round(res.duration_s, 2), "tables": res.table_count},
                       duration=res.duration_s, dumped=res.bytes_dumped, added=res.data_added)

    def finish(self, total: int) -> None:
        """Metrics, the table and the summary; the warnings into the log."""
        self.record_metrics()
        elapsed = self.elapsed
        self.table(self.rows, f"pg_backup of {self.inv.lab.name}: {total - len(self.failed)} "
                              f"ok / {len(self.failed)} failed / {len(self.warnings)} "
                              "warning(s)")
        self.summary(pg_summary(self.rows, self.warnings, elapsed))
        for w in self.warnings:
            self.logger.warning(w)


def pg_summary(rows: list[dict[str, Any]], warnings: list[str], elapsed: float) -> str:
    lines = ["# labkeeper pg_backup", "", f"{len(rows)} item(s) in {elapsed:.1f} s", "",
             "| | database | snapshot | bytes | MB/s | tables | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {ICON.get(r['status'], '')} | {r['database']} | {r['snapshot']} | "
                     f"{r['bytes dumped']} | {r['throughput MB/s']} | {r['tables']} | "
                     f"{cell(r['notes'])} |")
    return "\n".join(lines + warnings_section(warnings))


# ====================================================================== path_backup


def path_failed_row(set_label: str, detail: str) -> dict[str, Any]:
    return {"path set": set_label, "status": "failed", "snapshot": "", "files": 0,
            "bytes": 0, "bytes added (uncompressed)": 0, "new/changed/unmodified": "",
            "duration s": 0, "restic s": 0, "throughput MB/s": 0, "unreadable": 0,
            "restic": "", "backup id": "", "notes": redact(detail)}


class PathBackupReport(BackupReport):
    """The ``path-backup`` artifacts of a ``path_backup`` run."""

    def __init__(self, inv: Inventory, key: str, logger: Logger) -> None:
        super().__init__(inv, key, logger)
        self.results: list[path_backup.PathBackupResult] = []

    def path_set_done(self, name: str, state: Any) -> None:
        host = self.inv.path_backup(name).host
        label = f"{host}/{name}"
        resource = self.resource(f"labkeeper.paths.{label}", label, **{"labkeeper.kind": "paths"})
        series = {"series": path_backup.series_label(host, name), "kind": "paths"}
        if not state.is_completed():
            detail = state_error(state)
            self.failed_one(resource, series, label, path_failed_row(label, detail), detail)
            return
        res: path_backup.PathBackupResult = state.result()
        self.results.append(res)
        self.succeeded(resource, series, res.row(),
                       {"snapshot_id": res.snapshot_id, "backup_id": res.backup_id,
                        "status": res.status, "files": res.files,
                        "bytes": res.bytes_processed, "unreadable": res.unreadable_count,
                        "duration_s": round(res.duration_s, 2)},
                       duration=res.duration_s, dumped=res.bytes_processed,
                       added=res.data_added)

    def finish(self, total: int) -> None:
        """Metrics, the table and the summary."""
        self.record_metrics()
        elapsed = self.elapsed
        warned = [r for r in self.results if r.status != "ok"]
        self.table(self.rows, f"path_backup of {self.inv.lab.name}: "
                              f"{total - len(self.failed)} ok / {len(self.failed)} failed"
                              f" / {len(warned)} warning(s)")
        self.summary(path_summary(self.rows, self.results, elapsed))


def path_summary(rows: list[dict[str, Any]], results: list[path_backup.PathBackupResult],
                 elapsed: float) -> str:
    lines = ["# labkeeper path_backup", "", f"{len(rows)} path set(s) in {elapsed:.1f} s", "",
             "| | path set | snapshot | files | bytes | added | MB/s | unreadable | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {ICON.get(r['status'], '')} | {r['path set']} | {r['snapshot']} | "
                     f"{r['files']} | {r['bytes']} | {r['bytes added (uncompressed)']} | "
                     f"{r['throughput MB/s']} | {r['unreadable']} | "
                     f"{cell(r['notes'])[:500]} |")
    for res in results:
        lines += ["", f"## {res.host}/{res.name}: restic summary", "", "```json",
                  json.dumps(res.summary, indent=2, sort_keys=True), "```"]
        if res.unreadable_count:
            lines += ["", f"### {res.host}/{res.name}: {res.unreadable_count} unreadable "
                          "path(s) — the snapshot does not hold them", ""]
            lines += [f"- `{line}`" for line in path_backup.iter_unreadable_lines(res)]
    return redact("\n".join(lines))
