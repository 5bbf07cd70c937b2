"""The doctor flow: is every part of the lab reachable with the credentials we hold?"""

from __future__ import annotations

from prefect import flow, get_run_logger

from labkeeper import doctor
from labkeeper.inventory import load_inventory
from labkeeper.run_report import state_error
from labkeeper.run_report.doctor import DoctorReport
from labkeeper.secrets import redact
from tasks.common import RunFailed, lab_path
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
    report = DoctorReport(inv, "doctor", logger)
    futures = [(spec, run_check.submit(inv, spec)) for spec in specs]
    rows: list[doctor.CheckResult] = []
    for spec, fut in futures:
        fut.wait()
        if fut.state.is_completed():
            rows.append(fut.result())
        else:
            rows.append(doctor.CheckResult(spec.check, spec.target, "fail", 0,
                                           redact(state_error(fut.state))))
    if not inv.proxmox:
        rows.insert(0, doctor.CheckResult("proxmox", "-", "skip", 0, "not configured"))
    failed = report.finish(rows)
    table = [r.row() for r in rows]
    if failed:
        names = ", ".join(f"{r.check}:{r.target}" for r in failed)
        raise DoctorFailed(f"{len(failed)} of {len(rows)} checks failed: {names}", table)
    return table


if __name__ == "__main__":
    doctor_flow()
