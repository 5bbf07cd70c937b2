"""The job commands of the command line (``labkeeper backup run``, ``drill run``,
``provision plan|apply``, ``update``, ``vzdump run|sync-jobs``, ``paths run``): each
runs its flow now, prints what happened, and turns the run into an exit status.

Each command imports its own flow when it runs: ``labkeeper backup run`` does not pay
for importing the update or provisioning flows (see cli/main.py, lazy commands)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.secrets import redact

if TYPE_CHECKING:
    from labkeeper import provision as pv
    from labkeeper.update import Resolve


def run_drill_cli(lab: Path, target: str | None) -> int:
    """``labkeeper drill run [TARGET]``: run the drills now, print them; 0 when all passed."""
    from rich.console import Console
    from rich.table import Table

    from cli.report import state_rows
    from flows.dr_drill import dr_drill_flow

    console = Console()
    state = dr_drill_flow(target=target or "all", lab=str(lab), return_state=True)
    rows, exc = state_rows(state)
    if not state.is_completed():
        if not rows:
            console.print(f"[red]drill failed:[/red] {redact(str(exc) if exc else state.name)}",
                          markup=True)
    if rows:
        cols = ("drill", "target", "status", "rpo", "rpo objective", "rto", "rto objective",
                "checks", "source")
        table = Table(title="DR drills")
        for col in cols:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*(str(r[c]) for c in cols))
        console.print(table)
        for r in rows:
            if r["status"] != "passed":
                console.print(f"{r['drill']}:{r['target']}: {r['detail']}", markup=False)
            if r.get("kept"):
                console.print(f"{r['drill']}:{r['target']}: kept {r['kept']}", markup=False)
    return 0 if state.is_completed() else 1


def run_path_backup_cli(lab: Path, host: str | None, name: str | None) -> int:
    """``labkeeper paths run [--host H] [--name SET]``: run the flow, print the table,
    return the exit code (0 ok or warnings only, 1 when a set failed)."""
    from cli.report import print_run
    from flows.path_backup import path_backup_flow

    state = path_backup_flow(lab=str(lab), host=host, names=[name] if name else None,
                             return_state=True)
    return print_run(state, title="path_backup", name_col="path set", what="path backup",
                     cols=("path set", "status", "snapshot", "files", "bytes", "duration s",
                           "throughput MB/s", "unreadable"))


def run_backup_cli(lab: Path, db: str | None) -> int:
    """``labkeeper backup run [--db NAME]``: run the flow, print the table, exit code."""
    from cli.report import print_run
    from flows.pg_backup import pg_backup_flow, restic_ahead

    databases = [db] if db else None
    with restic_ahead(lab=str(lab), databases=databases):
        state = pg_backup_flow(lab=str(lab), databases=databases, return_state=True)
    return print_run(state, title="pg_backup", name_col="database", what="backup",
                     cols=("database", "status", "snapshot", "bytes dumped", "duration s",
                           "throughput MB/s", "tables"))


def _console() -> Any:
    from rich.console import Console

    return Console()


def print_plan(plan: pv.Plan) -> None:
    from rich.table import Table

    style = {"create": "green", "change": "yellow", "destroy": "bold red", "conflict": "bold red",
             "protected": "magenta", "unmanaged": "dim", "leave": "", "absent": "dim"}
    table = Table(title=plan.headline())
    for col in ("guest", "vmid", "type", "node", "action", "restart", "details"):
        table.add_column(col, overflow="fold")
    for r in plan.rows():
        st = style.get(r["action"], "")
        action = f"[{st}]{r['action']}[/]" if st else r["action"]
        table.add_row(str(r["guest"]), str(r["vmid"]), r["type"], r["node"], action,
                      r["restart"], r["details"], )
    console = _console()
    console.print(table)
    for p in plan.problems:
        console.print(f"[bold red]problem:[/] {p}", highlight=False)
    if plan.needs_yes:
        console.print(f"apply will need --yes: {len(plan.touched)} guests touched "
                      f"(max {plan.max_changes_without_yes} without it)")


def plan_cli(lab: Path, json_out: bool) -> int:
    """``labkeeper provision plan``: print the plan; changes nothing (GET requests only).

    Exit status: 0 the plan is clean, 1 it has problems, 2 the inventory or the
    cluster could not be read.
    """
    from labkeeper import provision as pv
    from labkeeper import proxmox as px
    from labkeeper.inventory import load_inventory

    try:
        inv = load_inventory(lab)
        if inv.proxmox is None:
            raise ConfigError(f"{lab}: no proxmox section: nothing to provision")
        plan = pv.read_plan(px.connect(inv.proxmox), inv)
    except ConfigError as exc:
        print("\n".join([str(exc), *exc.problems]), file=sys.stderr)
        return 2
    except LabkeeperError as exc:
        print(f"provision plan: {redact(str(exc))}", file=sys.stderr)
        return 2
    if json_out:
        print(plan.to_json())
    else:
        print_plan(plan)
    return 1 if plan.problems else 0


def apply_cli(lab: Path, *, allow_restart: bool, allow_destroy: bool, yes: bool) -> int:
    """``labkeeper provision apply``: run the provision flow; print every step.

    Exit status: 0 converged, 1 a guest failed / the plan has problems / the plan
    needs ``--yes``, 2 the inventory is invalid.
    """
    from flows.provision import ProvisionFailed, provision_flow
    from labkeeper.inventory import load_inventory

    try:
        load_inventory(lab)
    except ConfigError as exc:
        print("\n".join([str(exc), *exc.problems]), file=sys.stderr)
        return 2
    state = provision_flow(lab=str(lab), allow_restart=allow_restart,
                           allow_destroy=allow_destroy, yes=yes, return_state=True)
    result = state.result(raise_on_failure=False)
    report = result.report if isinstance(result, ProvisionFailed) else result
    console = _console()
    if isinstance(report, dict) and report.get("steps"):
        from rich.table import Table

        table = Table(title="labkeeper provision")
        for col in ("guest", "step", "status", "seconds", "detail"):
            table.add_column(col, overflow="fold")
        for r in report["steps"]:
            table.add_row(str(r["guest"]), r["step"], r["status"], str(r["seconds"]),
                          str(r["detail"]))
        console.print(table)
    if not state.is_completed():
        print(f"provision: {state.name}: {redact(str(result))}", file=sys.stderr)
        return 1
    return 0


def run_update_cli(lab: Path, apps: list[str], *, dry_run: bool, force: bool,
                   resolve: Resolve | None = None) -> int:
    """``labkeeper update [APP...] [--dry-run] [--force] [--resolve keep|rollback]``.

    Exit 0 when every app updated (or was current, skipped on purpose, dry run), 2
    when an app was rolled back (healthy on its old version), 3 when an app was not
    updated and needs attention (blocked by another update of its guest, held on a
    pin, or an old unfinished update waiting for a decision), 1 on failure."""
    from cli.report import state_rows
    from flows.update import update_app_flow

    state = update_app_flow(apps=apps or None, lab=str(lab), dry_run=dry_run,
                                   force=force, resolve=resolve, return_state=True)
    rows, exc = state_rows(state)
    if not state.is_completed():
        print(f"update: {state.name}: {redact(state.message or str(exc))}")
    for r in rows:
        print(f"{r['status']:12} {r['app']:16} before {r['before']} → attempted "
              f"{r['attempted']} → now {r['after']}  {r['detail']}")
    if state.is_completed():
        return 0
    return {"RolledBack": 2, "NotUpdated": 3}.get(state.name or "", 1)


def run_vzdump_cli(lab: Path, job: str, *, force: bool = False,
                   dry_run_retention: bool = False) -> int:
    """``labkeeper vzdump run JOB``: run the flow now; 0 when every guest is good."""
    from cli.report import state_rows
    from flows.vzdump import vzdump_flow

    state = vzdump_flow(job=job, lab=str(lab), force=force,
                        dry_run_retention=dry_run_retention, return_state=True)
    rows, exc = state_rows(state)
    if not state.is_completed():
        print(f"vzdump {job}: {redact(str(exc)) if exc else state.name}")
    for r in rows:
        print(f"{r['status']:8} {r['vmid']:>6} {r['node']:6} {r['archive'] or '-'} "
              f"{r['detail']}")
    return 0 if state.is_completed() else 1


def sync_jobs_cli(lab: Path, apply: bool) -> int:
    """``labkeeper vzdump sync-jobs [--apply]``: show (and apply) the native job plan."""
    from labkeeper import proxmox as px
    from labkeeper import vzdump as core
    from labkeeper.inventory import load_inventory
    from tasks import vzdump as vt

    inv = load_inventory(str(lab))
    api = vt.api_for(inv)
    plan = core.plan_native_jobs(inv.vzdump_jobs, px.list_backup_jobs(api),
                                 px.list_guests(api), core.inventory_vmids(inv))
    if not plan:
        print("no vzdump job is marked native: true; nothing to sync")
        return 0
    for change in plan:
        print(change.line())
    changes = [c for c in plan if c.action != "unchanged"]
    if not apply:
        if changes:
            print(f"{len(changes)} change(s); run again with --apply to make them")
        return 0
    for line in core.apply_native_plan(api, changes):
        print(f"done: {line}")
    return 0


