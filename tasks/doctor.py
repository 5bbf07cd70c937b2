"""Doctor checks as Prefect tasks: one task run per part of the lab."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from labkeeper import doctor
from labkeeper.inventory import Inventory
from tasks.common import RETRY


@task(name="doctor-check", task_run_name="check-{spec.check}-{spec.target}",
      timeout_seconds=180, cache_policy=NO_CACHE, **RETRY)
def run_check(inv: Inventory, spec: doctor.CheckSpec) -> doctor.CheckResult:
    """Check that one part of the lab is reachable and accepts our credentials."""
    return doctor.run_check(inv, spec)
