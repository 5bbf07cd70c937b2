"""The doctor flow: is every part of the lab reachable with the credentials we hold?"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from labkeeper import doctor
from labkeeper.inventory import load_inventory
from labkeeper.secrets import redact
from tasks.common import RunFailed, failure_of, lab_path
from tasks.doctor import run_check
from tasks.hooks import hooks


class DoctorFailed(RunFailed):
    """At least one doctor check failed."""


@flow(name="doctor", log_prints=False, timeout_seconds=900, **hooks("doctor"))
def doctor_flow(lab: str | None = None) -> list[dict]:
    """Check Proxmox, SSH hosts, databases, restic repositories and buckets of the lab.

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
    """
    logger = get_run_logger()
    inv = load_inventory(lab_path(lab))
    specs = doctor.plan_checks(inv)
    logger.info("doctor: %d checks for lab %s", len(specs), inv.lab.name)
    started = time.monotonic()
    futures = [(spec, run_check.submit(inv, spec)) for spec in specs]
    rows: list[doctor.CheckResult] = []
    for spec, fut in futures:
        fut.wait()
        state = fut.state
        if state.is_completed():
            rows.append(fut.result())
        else:
            exc = failure_of(state)
            detail = f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name)
            rows.append(doctor.CheckResult(spec.check, spec.target, "fail", 0, redact(detail)))
    if not inv.proxmox:
        rows.insert(0, doctor.CheckResult("proxmox", "-", "skip", 0, "not configured"))
    table = [r.row() for r in rows]
    failed = [r for r in rows if r.status == "fail"]
    create_table_artifact(key="doctor", table=table,
                          description=f"labkeeper doctor: {len(rows) - len(failed)} ok / "
                                      f"{len(failed)} failed")
    create_markdown_artifact(key="doctor-summary",
                             markdown=_summary(rows, time.monotonic() - started))
    for r in rows:
        log = logger.error if r.status == "fail" else logger.info
        log("%-10s %-20s %-4s %6d ms  %s", r.check, r.target, r.status, r.latency_ms, r.detail)
    if failed:
        names = ", ".join(f"{r.check}:{r.target}" for r in failed)
        raise DoctorFailed(f"{len(failed)} of {len(rows)} checks failed: {names}", table)
    return table


def _summary(rows: list[doctor.CheckResult], elapsed: float) -> str:
    icon = {"ok": "✅", "warn": "⚠️", "fail": "❌", "skip": "·"}
    lines = ["# labkeeper doctor", "", f"{len(rows)} checks in {elapsed:.1f} s", "",
             "| | check | target | latency | detail |", "|---|---|---|---|---|"]
    for r in rows:
        detail = r.detail.replace("|", "\\|")
        lines.append(f"| {icon[r.status]} | {r.check} | {r.target} | {r.latency_ms} ms "
                     f"| {detail} |")
    return "\n".join(lines)


if __name__ == "__main__":
    doctor_flow()
