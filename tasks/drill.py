"""DR drill steps as Prefect tasks (thin wrappers over labkeeper.drill).

A drill that *failed* (verification, objective, a fault) is returned as a failed
:class:`~labkeeper.drill.DrillResult`, not raised: the flow reports it. Only a
failure that may go away (a repository backend or the Proxmox API unreachable) is
raised as :class:`~labkeeper.drill.DrillFailed` (transient), so Prefect retries it.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from labkeeper import drill, drill_paths
from labkeeper.inventory import Inventory
from tasks.common import RETRY

DATABASE_TASK_TIMEOUT = 6 * 3600
GUEST_TASK_TIMEOUT = 3 * 3600
REPOSITORY_TASK_TIMEOUT = 12 * 3600


def _settle(result: drill.DrillResult) -> drill.DrillResult:
    if not result.passed and result.transient:
        raise drill.DrillFailed(result)
    return result


@task(name="dr-drill-database", task_run_name="drill-db-{name}",
      timeout_seconds=DATABASE_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def database_drill(inv: Inventory, name: str) -> drill.DrillResult:
    """Restore the latest dump into a scratch database and verify it against its manifest."""
    return _settle(drill.database_drill(inv, name))


@task(name="dr-drill-guest", task_run_name="drill-guest-{name}",
      timeout_seconds=GUEST_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def guest_drill(inv: Inventory, name: str, poll: float = 0.5) -> drill.DrillResult:
    """Restore the latest vzdump archive to a scratch VMID, isolated; boot; destroy."""
    return _settle(drill.guest_drill(inv, name, poll=poll))


@task(name="dr-drill-repository", task_run_name="drill-repo-{name}",
      timeout_seconds=REPOSITORY_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def repository_drill(inv: Inventory, name: str) -> drill.DrillResult:
    """restic check of a rotating pack subset and a random snapshot restored byte for byte."""
    return _settle(drill.repository_drill(inv, name))


PATHS_TASK_TIMEOUT = 6 * 3600


@task(name="dr-drill-paths", task_run_name="drill-paths-{name}",
      timeout_seconds=PATHS_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def paths_drill(inv: Inventory, name: str) -> drill.DrillResult:
    """A random sample of a path set's latest snapshot compared with its host by SHA-256."""
    return _settle(drill_paths.paths_drill(inv, name))


PITR_TASK_TIMEOUT = 6 * 3600


@task(name="dr-drill-pitr", task_run_name="drill-pitr-{name}",
      timeout_seconds=PITR_TASK_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def pitr_drill(inv: Inventory, name: str) -> drill.DrillResult:
    """Point-in-time restores (a random moment, the newest, each dump's LSN) in scratch
    clusters, as the ``pitr_drill`` flow runs them; RTO/RPO against the objectives."""
    from labkeeper.pitr import drill as pitr_drill_mod

    return _settle(pitr_drill_mod.dr_drill(inv, name))


BY_KIND = {"database": database_drill, "guest": guest_drill, "repository": repository_drill,
           "paths": paths_drill, "pitr": pitr_drill}
