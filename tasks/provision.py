"""Provisioning steps as Prefect tasks: thin, named, retried wrappers over labkeeper.provision.

Every step re-reads the state it acts on (check, then change), so a retry — or a
rerun after a crash — converges instead of repeating work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from labkeeper import bootstrap as bs
from labkeeper import provision as pv
from labkeeper import proxmox as px
from labkeeper.inventory import Guest, Inventory
from tasks.common import RETRY

# Outer bounds only: every API wait, SSH wait and remote command has its own deadline.
PLAN_TIMEOUT = 300
CREATE_TIMEOUT = 2 * 3600
STEP_TIMEOUT = 3600
SSH_WAIT_TIMEOUT = 3600
BOOTSTRAP_TIMEOUT = 4 * 3600


def _api(inv: Inventory) -> Any:
    assert inv.proxmox is not None
    return px.connect(inv.proxmox)


@task(name="provision-plan", timeout_seconds=PLAN_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def read_plan(inv: Inventory) -> pv.Plan:
    """Read the cluster (GET only) and diff it against the inventory."""
    return pv.read_plan(_api(inv), inv)


@task(name="provision-create", task_run_name="create-{guest.name}",
      timeout_seconds=CREATE_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def create_guest(inv: Inventory, guest: Guest) -> pv.StepResult:
    """Create the guest from its template (LXC) or by cloning (QEMU), unless it exists."""
    return pv.create_guest(_api(inv), inv, guest)


@task(name="provision-configure", task_run_name="configure-{guest.name}",
      timeout_seconds=STEP_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def configure_guest(inv: Inventory, guest: Guest, allow_restart: bool) -> pv.StepResult:
    """Apply resource, network, tag and disk-growth changes (restarts only if allowed)."""
    return pv.converge_guest(_api(inv), inv, guest, allow_restart=allow_restart)


@task(name="provision-start", task_run_name="start-{guest.name}",
      timeout_seconds=STEP_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def start_guest(inv: Inventory, guest: Guest) -> pv.StepResult:
    return pv.start_guest(_api(inv), inv, guest)


@task(name="provision-wait-ssh", task_run_name="wait-ssh-{guest.name}",
      timeout_seconds=SSH_WAIT_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def wait_for_ssh(inv: Inventory, guest: Guest) -> pv.StepResult:
    """Wait until the guest answers SSH with the expected host key."""
    return pv.wait_for_ssh(inv, guest)


@task(name="provision-bootstrap", task_run_name="bootstrap-{guest.name}",
      timeout_seconds=BOOTSTRAP_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def bootstrap_guest(inv: Inventory, guest: Guest, base_dir: str,
                    state_dir: str = bs.DEFAULT_STATE_DIR) -> pv.StepResult:
    """Packages, files, commands and Compose stack of the guest's roles (idempotent)."""
    return bs.run_bootstrap(inv, guest, base_dir=Path(base_dir), state_dir=state_dir)


@task(name="provision-protect", task_run_name="protect-{guest.name}",
      timeout_seconds=STEP_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def protect_guest(inv: Inventory, guest: Guest) -> pv.StepResult:
    return pv.protect_guest(_api(inv), inv, guest)


@task(name="provision-destroy", task_run_name="destroy-{guest.name}",
      timeout_seconds=STEP_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def destroy_guest(inv: Inventory, guest: Guest) -> pv.StepResult:
    """Destroy a guest the inventory marks absent (only with --allow-destroy)."""
    return pv.destroy_guest(_api(inv), inv, guest)


@task(name="provision-cleanup", task_run_name="cleanup-{guest.name}",
      timeout_seconds=STEP_TIMEOUT, cache_policy=NO_CACHE, **RETRY)
def cleanup_guest(inv: Inventory, guest: Guest, reason: str) -> pv.StepResult:
    """Destroy (or report) a guest whose creation failed half-way, per the inventory."""
    return pv.cleanup_guest(_api(inv), inv, guest, reason)
