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

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from labkeeper import provision as pv
from labkeeper.errors import PicklableError
from labkeeper.inventory import Guest, Inventory, load_inventory
from labkeeper.run_report.provision import ProvisionReport
from tasks import provision as steps
from tasks.common import lab_path
from tasks.hooks import hooks

PLAN_ARTIFACT = "provision-plan"
RESULT_ARTIFACT = "provision"


class ProvisionFailed(PicklableError):
    """A guest failed, the plan has problems, or the guardrails refused the run."""

    def __init__(self, message: str, report: dict | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


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
    report = ProvisionReport(inv, RESULT_ARTIFACT, logger)
    plan: pv.Plan = steps.read_plan(inv)
    report.plan(plan, PLAN_ARTIFACT)
    if plan_only:
        return plan.to_dict()

    opts = pv.ApplyOptions(allow_restart=allow_restart, allow_destroy=allow_destroy, yes=yes,
                           bootstrap=bootstrap)
    run = _step_runner(inv, allow_restart, base_dir=str(Path(path).resolve().parent),
                       guest_state_dir=str(inv.settings.provision.guest_state_dir))
    try:
        applied = pv.apply_plan(plan, inv, opts, run)
    except pv.TooManyChanges as exc:
        logger.error(str(exc))
        raise ProvisionFailed(str(exc), {"ok": False, "needs_yes": True,
                                         "plan": plan.to_dict()}) from None
    after: pv.Plan = steps.read_plan(inv)
    result = applied.to_dict()
    result["remaining"] = after.to_dict()
    result["seconds"] = round(report.elapsed, 2)
    report.applied(applied, after, result["seconds"])
    if not applied.ok:
        raise ProvisionFailed(applied.summary(), result)
    return result


def _step_runner(inv: Inventory, allow_restart: bool, *, base_dir: str,
                 guest_state_dir: str) -> Callable[[str, Guest, str], pv.StepResult]:
    """The task run of each provisioning step, for :func:`labkeeper.provision.apply_plan`."""
    by_step: dict[str, Callable[[Guest, str], pv.StepResult]] = {
        "create": lambda g, _r: steps.create_guest(inv, g),
        "configure": lambda g, _r: steps.configure_guest(inv, g, allow_restart),
        "start": lambda g, _r: steps.start_guest(inv, g),
        "wait-ssh": lambda g, _r: steps.wait_for_ssh(inv, g),
        "bootstrap": lambda g, _r: steps.bootstrap_guest(inv, g, base_dir, guest_state_dir),
        "protect": lambda g, _r: steps.protect_guest(inv, g),
        "destroy": lambda g, _r: steps.destroy_guest(inv, g),
        "cleanup": lambda g, reason: steps.cleanup_guest(inv, g, reason),
    }

    def run(step: str, guest: Guest, reason: str) -> pv.StepResult:
        if step not in by_step:
            raise ValueError(f"unknown provisioning step {step!r}")
        return by_step[step](guest, reason)

    return run


if __name__ == "__main__":
    provision_flow()
