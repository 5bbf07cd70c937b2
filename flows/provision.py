"""Provisioning: the inventory's guests made real — plan first, then apply, then bootstrap.

1. Plan: read the cluster (GET only) and diff it against the inventory; the plan is
   a markdown artifact ``provision-plan`` and the first lines of the log.
2. Guardrails: more guests touched than ``max_changes_without_yes`` needs ``yes``.
3. Per guest, in dependency order: create (LXC from its template / QEMU clone),
   configure (resources, network, tags, disk growth; restarts only with
   ``allow_restart``), start, wait for SSH with the expected host key, bootstrap its
   roles, protect. A creation that fails half-way is destroyed or reported
   (``cleanup_on_failure``). Guests marked ``absent`` are destroyed only with
   ``allow_destroy``.
4. Proof: the cluster is planned again at the end; the table artifact ``provision``
   lists every step (changed / unchanged / held / failed) and the remaining plan.

The run fails at the end if any guest failed or the plan has problems (a missing
template, a disk that would have to shrink, a vmid held by a foreign guest).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from labkeeper import provision as pv
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.inventory import Guest, load_inventory
from labkeeper.secrets import redact
from tasks import provision as steps
from tasks.common import lab_path
from tasks.hooks import hooks

PLAN_ARTIFACT = "provision-plan"
RESULT_ARTIFACT = "provision"


class ProvisionFailed(Exception):
    """A guest failed, the plan has problems, or the guardrails refused the run."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}

    def __reduce__(self) -> tuple:
        return (ProvisionFailed, (str(self), self.report))


@flow(name="provision", log_prints=False, timeout_seconds=12 * 3600, **hooks("provision"))
def provision_flow(lab: str | None = None, allow_restart: bool = False,
                   allow_destroy: bool = False, yes: bool = False, plan_only: bool = False,
                   bootstrap: bool = True) -> dict[str, Any]:
    """Make Proxmox match the inventory's guests, then bootstrap them over SSH.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
        allow_restart: Restart running guests whose changes need a restart.
        allow_destroy: Destroy the guests the inventory marks state: absent.
        yes: Accept a plan that touches more guests than
            settings.provision.max_changes_without_yes.
        plan_only: Only show the plan (the Artifacts page); change nothing.
        bootstrap: Bootstrap guests over SSH (packages, files, Compose) after creating
            them.
    """
    logger = get_run_logger()
    path = lab_path(lab)
    inv = load_inventory(path)
    guest_state_dir = str(inv.settings.provision.guest_state_dir)
    started = time.monotonic()
    plan: pv.Plan = steps.read_plan(inv)
    create_markdown_artifact(key=PLAN_ARTIFACT, markdown=plan.markdown(),
                             description=plan.headline())
    logger.info(plan.headline())
    for row in plan.rows():
        if row["action"] not in ("leave", "absent"):
            logger.info("%-16s %6s %-4s %-5s %-9s %s", row["guest"], row["vmid"], row["type"],
                        row["node"], row["action"], row["details"])
    for problem in plan.problems:
        logger.error("plan problem: %s", problem)
    if plan_only:
        return plan.to_dict()

    opts = pv.ApplyOptions(allow_restart=allow_restart, allow_destroy=allow_destroy, yes=yes,
                           bootstrap=bootstrap)
    base_dir = str(Path(path).resolve().parent)

    def run(step: str, guest: Guest, reason: str) -> pv.StepResult:
        if step == "create":
            return steps.create_guest(inv, guest)
        if step == "configure":
            return steps.configure_guest(inv, guest, allow_restart)
        if step == "start":
            return steps.start_guest(inv, guest)
        if step == "wait-ssh":
            return steps.wait_for_ssh(inv, guest)
        if step == "bootstrap":
            return steps.bootstrap_guest(inv, guest, base_dir, guest_state_dir)
        if step == "protect":
            return steps.protect_guest(inv, guest)
        if step == "destroy":
            return steps.destroy_guest(inv, guest)
        if step == "cleanup":
            return steps.cleanup_guest(inv, guest, reason)
        raise ValueError(f"unknown provisioning step {step!r}")

    try:
        report = pv.apply_plan(plan, inv, opts, run, log=logger.warning)
    except pv.TooManyChanges as exc:
        logger.error(str(exc))
        raise ProvisionFailed(str(exc), {"ok": False, "needs_yes": True,
                                         "plan": plan.to_dict()}) from None
    after: pv.Plan = steps.read_plan(inv)
    result = report.to_dict()
    result["remaining"] = after.to_dict()
    result["seconds"] = round(time.monotonic() - started, 2)
    create_table_artifact(key=RESULT_ARTIFACT, table=report.rows(),
                          description=report.summary())
    create_markdown_artifact(key=f"{RESULT_ARTIFACT}-summary",
                             markdown=_summary(report, after, result["seconds"]))
    for r in report.results:
        log = logger.error if r.status == "failed" else logger.info
        log("%-16s %-10s %-9s %s", r.guest, r.step, r.status, redact(r.detail))
    logger.info("after apply: %s", after.headline())
    if not report.ok:
        raise ProvisionFailed(report.summary(), result)
    return result


def _summary(report: pv.ApplyReport, after: pv.Plan, seconds: float) -> str:
    icon = {"changed": "✏️", "unchanged": "·", "ok": "✅", "held": "⏸️", "skipped": "·",
            "failed": "❌", "cleanup": "🧹"}
    lines = [f"# Provisioning — {report.plan.lab}", "", f"{report.summary()} in {seconds:.1f} s",
             "", "| | guest | step | status | detail |", "|---|---|---|---|---|"]
    for r in report.results:
        detail = redact(r.detail).replace("|", "\\|")
        lines.append(f"| {icon.get(r.status, '')} | {r.guest} | {r.step} | {r.status} | "
                     f"{detail} |")
    if report.left_for_cleanup:
        lines += ["", "## Left for cleanup", *(f"- {g}" for g in report.left_for_cleanup)]
    lines += ["", "## Plan after apply", "", after.headline()]
    for g in after.guests:
        if g.touches or g.problems:
            lines.append(f"- {g.name} ({g.vmid}): {g.action} — {g.summary()}")
    return "\n".join(lines)


# ====================================================================== CLI entry points


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
    from labkeeper import proxmox as px

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


if __name__ == "__main__":
    provision_flow()
