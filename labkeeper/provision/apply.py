"""Apply a plan: run each guest's steps in dependency order through a pluggable runner.

The flow passes a runner that calls Prefect tasks; :func:`local_runner` calls the
steps directly. A failing guest does not stop the others; a guest whose creation
failed half-way is cleaned up (or reported) per ``cleanup_on_failure``. Guardrails:
more than ``max_changes_without_yes`` touched guests need ``yes``, restarts
``allow_restart``, destroys ``allow_destroy``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.converge import converge_guest, protect_guest, start_guest
from labkeeper.provision.create import create_guest
from labkeeper.provision.destroy import cleanup_guest, destroy_guest
from labkeeper.provision.errors import TooManyChanges, VmidTaken
from labkeeper.provision.plan import GuestPlan, Plan
from labkeeper.provision.ssh_wait import wait_for_ssh
from labkeeper.provision.steps import StepResult
from labkeeper.secrets import redact

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApplyOptions:
    allow_restart: bool = False
    allow_destroy: bool = False
    yes: bool = False
    bootstrap: bool = True


def steps_for(gp: GuestPlan, guest: Guest | None, opts: ApplyOptions) -> list[str]:
    """Which steps a guest's plan entry runs, in order (pure)."""
    if guest is None or gp.action in ("unmanaged", "conflict", "absent", "protected"):
        return []
    if gp.action == "destroy":
        return ["destroy"] if opts.allow_destroy else []
    if gp.action == "create" and gp.problems:
        return []
    steps = ["create", "configure"] if gp.action == "create" else (
        ["configure"] if gp.action == "change" and any(
            c.kind not in ("start", "protect") for c in gp.changes) else [])
    steps.append("start")
    if guest.ssh is not None:
        steps.append("wait-ssh")
        if opts.bootstrap and guest.roles:
            steps.append("bootstrap")
    if guest.protection:
        steps.append("protect")
    return steps


StepRunner = Callable[[str, Guest, str], StepResult]
"""``run(step, guest, reason)``: run one step (``reason`` is for ``cleanup``); raises on failure."""


@dataclass
class ApplyReport:
    plan: Plan
    results: list[StepResult] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left_for_cleanup: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.plan.problems

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": self.failed, "left_for_cleanup": self.left_for_cleanup,
                "problems": self.plan.problems, "steps": self.rows(),
                "plan": self.plan.to_dict()}

    def summary(self) -> str:
        changed = sum(r.status == "changed" for r in self.results)
        text = (f"provision {self.plan.lab}: {changed} step(s) changed something, "
                f"{len(self.failed)} guest(s) failed")
        if self.left_for_cleanup:
            text += f", left for cleanup: {', '.join(self.left_for_cleanup)}"
        if self.plan.problems:
            text += f"; {len(self.plan.problems)} plan problem(s)"
        return text


def check_guardrails(plan: Plan, opts: ApplyOptions) -> None:
    if plan.needs_yes and not opts.yes:
        names = ", ".join(f"{g.name} ({g.action})" for g in plan.touched)
        raise TooManyChanges(
            f"the plan touches {len(plan.touched)} guests, more than "
            f"settings.provision.max_changes_without_yes={plan.max_changes_without_yes}: "
            f"{names}; review the plan and rerun with --yes", problems=[names])


def apply_plan(plan: Plan, inv: Inventory, opts: ApplyOptions, run: StepRunner
               ) -> ApplyReport:
    """Run every guest's steps in dependency order; clean up failed creations.

    A failing guest does not stop the others (guests depending on it are
    skipped); the report lists every failure and every guest left for cleanup.
    """
    check_guardrails(plan, opts)
    report = ApplyReport(plan)
    by_name = {g.name: g for g in inv.guests}
    failed: set[str] = set()
    for gp in plan.guests:
        guest = by_name.get(gp.name) if gp.in_inventory else None
        if guest is None:
            continue
        if gp.action == "destroy" and not opts.allow_destroy:
            report.results.append(StepResult(gp.name, "destroy", "held",
                                             "marked absent: rerun with --allow-destroy"))
            continue
        if gp.problems and gp.action in ("create", "conflict", "protected"):
            report.results.append(StepResult(gp.name, "plan", "failed", "; ".join(gp.problems)))
            failed.add(gp.name)
            continue
        blocked = [d for d in guest.depends_on if d in failed]
        if blocked:
            report.results.append(StepResult(gp.name, "plan", "skipped",
                                             f"depends on failed {', '.join(blocked)}"))
            failed.add(gp.name)
            continue
        creating = False
        for step in steps_for(gp, guest, opts):
            if step == "create":
                creating = True
            try:
                report.results.append(run(step, guest, ""))
            except Exception as exc:
                detail = f"{type(exc).__name__}: {exc}"
                report.results.append(StepResult(gp.name, step, "failed", redact(detail)))
                failed.add(gp.name)
                logger.warning("%s: %s failed: %s", gp.name, step, redact(detail))
                if creating and not isinstance(exc, VmidTaken):
                    _cleanup(report, run, guest, f"{step} failed: {exc}")
                break
    report.failed = sorted(failed)
    return report


def _cleanup(report: ApplyReport, run: StepRunner, guest: Guest, reason: str) -> None:
    try:
        res = run("cleanup", guest, redact(reason))
    except Exception as exc:
        res = StepResult(guest.name, "cleanup", "failed",
                         f"LEFT FOR CLEANUP: cleanup failed: {type(exc).__name__}: {exc}")
    report.results.append(res)
    if res.status == "failed":
        report.left_for_cleanup.append(f"{guest.name} ({guest.vmid})")


def local_runner(api_factory: Callable[[], Any], inv: Inventory, opts: ApplyOptions, *,
                 bootstrap: Callable[[Inventory, Guest], StepResult] | None = None,
                 ) -> StepRunner:
    """A runner calling the steps directly (no Prefect): for tests and tools."""

    def run(step: str, guest: Guest, reason: str) -> StepResult:
        return run_step(step, api_factory(), inv, guest, opts, reason=reason,
                        bootstrap=bootstrap)

    return run


def run_step(step: str, api: Any, inv: Inventory, guest: Guest, opts: ApplyOptions, *,
             reason: str = "", bootstrap: Callable[[Inventory, Guest], StepResult] | None = None,
             ) -> StepResult:
    """Dispatch one step by name."""
    if step == "create":
        return create_guest(api, inv, guest)
    if step == "configure":
        return converge_guest(api, inv, guest, allow_restart=opts.allow_restart)
    if step == "start":
        return start_guest(api, inv, guest)
    if step == "wait-ssh":
        return wait_for_ssh(inv, guest)
    if step == "bootstrap":
        if bootstrap is None:
            return StepResult(guest.name, "bootstrap", "skipped", "no bootstrap runner")
        return bootstrap(inv, guest)
    if step == "protect":
        return protect_guest(api, inv, guest)
    if step == "destroy":
        return destroy_guest(api, inv, guest)
    if step == "cleanup":
        return cleanup_guest(api, inv, guest, reason)
    raise ValueError(f"unknown provisioning step {step!r}")


def results_table(results: Iterable[StepResult]) -> list[dict[str, Any]]:
    return [r.row() for r in results]
