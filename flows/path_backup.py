"""The nightly file backup: each path set backed up by restic on the host that holds it.

Per run: the selected path sets (default: all; ``host=`` limits to one host) in turn
(``tasks.path_backup.backup_path_set``: restic checked on the host, locks handled,
``restic backup --json`` over SSH with the secrets on stdin, progress in the log,
the snapshot proven by its attempt tag). Earlier failed attempts whose cleanup could
not finish (host unreachable) are swept first, and what was done is in the set's notes
(see ``labkeeper.path_backup.sweep_pending``). A set whose files were partly unreadable
(restic exit 3), or whose pending cleanup is still incomplete, is a *warning* with the
reason in the artifact; one failed set does
not stop the others; the run fails at the end if any failed. Leaves a table artifact
``path-backup`` and a markdown ``path-backup-summary``, emits
``labkeeper.backup.succeeded`` / ``labkeeper.backup.failed`` per set, records the
backup metrics; the flow hooks ping healthchecks for ``path_backup``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from flows.report import print_run
from labkeeper import metrics, path_backup
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.secrets import redact
from tasks import path_backup as path_tasks
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

ARTIFACT_KEY = "path-backup"


class PathBackupRunFailed(RunFailed):
    """At least one path set failed."""


def _emit(inv: Inventory, name: str, ok: bool, payload: dict[str, Any]) -> None:
    pb = inv.path_backup(name)
    emit_event(
        event=f"labkeeper.backup.{'succeeded' if ok else 'failed'}",
        resource={"prefect.resource.id": f"labkeeper.paths.{pb.host}/{name}",
                  "prefect.resource.name": f"{pb.host}/{name}", "labkeeper.lab": inv.lab.name,
                  "labkeeper.kind": "paths"},
        payload=payload,
    )


def _failed_row(inv: Inventory, name: str, detail: str) -> dict[str, Any]:
    pb = inv.path_backup(name)
    return {"path set": f"{pb.host}/{name}", "status": "failed", "snapshot": "", "files": 0,
            "bytes": 0, "bytes added (uncompressed)": 0, "new/changed/unmodified": "",
            "duration s": 0, "restic s": 0, "throughput MB/s": 0, "unreadable": 0,
            "restic": "", "backup id": "", "notes": redact(detail)}


@flow(name="path_backup", log_prints=False, timeout_seconds=26 * 3600,
      **hooks("path_backup"))
def path_backup_flow(lab: str | None = None, host: str | None = None,
                     names: list[str] | None = None) -> list[dict]:
    """Back up the lab's path sets (default: all; ``host``: only that host's).

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        host: Only the path sets on this host (its name in the inventory).
        names: Only these path sets (their names in path_backups); empty: all.
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    chosen = path_backup.select_path_sets(inv, host, names)
    logger.info("path_backup: %d path set(s) of lab %s: %s", len(chosen), inv.lab.name,
                ", ".join(f"{inv.path_backup(n).host}/{n}" for n in chosen))
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    results: list[path_backup.PathBackupResult] = []
    failed: list[str] = []
    samples: list[metrics.Sample] = []
    for name in chosen:
        pb = inv.path_backup(name)
        state = path_tasks.backup_path_set(inv, name, return_state=True)
        series = {"series": path_backup.series_label(pb.host, name), "kind": "paths"}
        samples.append(metrics.Sample("labkeeper_backup_last_run_timestamp_seconds", series,
                                      time.time()))
        samples.append(metrics.Sample("labkeeper_backup_success", series,
                                      1 if state.is_completed() else 0))
        if state.is_completed():
            res: path_backup.PathBackupResult = state.result()
            results.append(res)
            samples += [
                metrics.Sample("labkeeper_backup_last_success_timestamp_seconds", series,
                               time.time()),
                metrics.Sample("labkeeper_backup_duration_seconds", series, res.duration_s),
                metrics.Sample("labkeeper_backup_dumped_bytes", series, res.bytes_processed),
                metrics.Sample("labkeeper_backup_added_bytes", series, res.data_added),
            ]
            rows.append(res.row())
            _emit(inv, name, True, {"snapshot_id": res.snapshot_id, "backup_id": res.backup_id,
                                    "status": res.status, "files": res.files,
                                    "bytes": res.bytes_processed,
                                    "unreadable": res.unreadable_count,
                                    "duration_s": round(res.duration_s, 2)})
        else:
            exc = failure_of(state)
            detail = f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name)
            logger.error("%s/%s: %s", pb.host, name, redact(detail))
            failed.append(f"{pb.host}/{name}")
            rows.append(_failed_row(inv, name, detail))
            _emit(inv, name, False, {"error": redact(detail)[:2000]})
    try:
        metrics.record(inv.settings.state_dir, inv.settings.metrics.textfile, samples)
    except OSError as exc:
        logger.warning("metrics not recorded: %s", exc)
    elapsed = time.monotonic() - started
    warned = [r for r in results if r.status != "ok"]
    create_table_artifact(key=ARTIFACT_KEY, table=rows,
                          description=f"path_backup of {inv.lab.name}: "
                                      f"{len(chosen) - len(failed)} ok / {len(failed)} failed"
                                      f" / {len(warned)} warning(s)")
    create_markdown_artifact(key=f"{ARTIFACT_KEY}-summary",
                             markdown=summary_markdown(rows, results, elapsed))
    if failed:
        raise PathBackupRunFailed(f"{len(failed)} of {len(chosen)} path set backups failed: "
                                  f"{', '.join(failed)}", rows)
    return rows


def summary_markdown(rows: list[dict[str, Any]], results: list[path_backup.PathBackupResult],
                     elapsed: float) -> str:
    icon = {"ok": "✅", "warning": "⚠️", "failed": "❌"}
    lines = ["# labkeeper path_backup", "", f"{len(rows)} path set(s) in {elapsed:.1f} s", "",
             "| | path set | snapshot | files | bytes | added | MB/s | unreadable | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        notes = str(r["notes"]).replace("|", "\\|")[:500]
        lines.append(f"| {icon.get(r['status'], '')} | {r['path set']} | {r['snapshot']} | "
                     f"{r['files']} | {r['bytes']} | {r['bytes added (uncompressed)']} | "
                     f"{r['throughput MB/s']} | {r['unreadable']} | {notes} |")
    for res in results:
        lines += ["", f"## {res.host}/{res.name}: restic summary", "", "```json",
                  _json(res.summary), "```"]
        if res.unreadable_count:
            lines += ["", f"### {res.host}/{res.name}: {res.unreadable_count} unreadable "
                          "path(s) — the snapshot does not hold them", ""]
            lines += [f"- `{line}`" for line in path_backup.iter_unreadable_lines(res)]
    return redact("\n".join(lines))


def _json(data: dict[str, Any]) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=True)


def run_path_backup_cli(lab: Path, host: str | None, name: str | None) -> int:
    """``labkeeper paths run [--host H] [--name SET]``: run the flow, print the table,
    return the exit code (0 ok or warnings only, 1 when a set failed)."""
    state = path_backup_flow(lab=str(lab), host=host, names=[name] if name else None,
                             return_state=True)
    return print_run(state, title="path_backup", name_col="path set", what="path backup",
                     cols=("path set", "status", "snapshot", "files", "bytes", "duration s",
                           "throughput MB/s", "unreadable"))


if __name__ == "__main__":
    path_backup_flow()
