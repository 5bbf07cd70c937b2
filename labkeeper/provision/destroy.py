"""Remove guests: one the inventory marks ``absent`` (only with ``--allow-destroy``),
or one whose creation failed half-way (per ``cleanup_on_failure``)."""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.desired import normalise
from labkeeper.provision.errors import ProvisionError
from labkeeper.provision.steps import (
    StepResult,
    check_ours,
    is_ours,
    lookup,
    read_guest,
    stop_and_destroy,
)

logger = logging.getLogger(__name__)


def destroy_guest(api: Any, inv: Inventory, guest: Guest) -> StepResult:
    """Destroy an ``absent`` guest of ours (stop first); gone already is ``unchanged``."""
    started = time.monotonic()
    found, config = read_guest(api, guest)
    if found is None:
        return StepResult(guest.name, "destroy", "unchanged", "already absent")
    check_ours(found, guest, inv.settings.provision.managed_tag, "destroy")
    if normalise(config.get("protection")) == "1":
        raise ProvisionError(f"{guest.name}: protection=1: labkeeper never destroys it")
    logger.info("%s: destroying %s %s on %s", guest.name, found.type, found.vmid, found.node)
    stop_and_destroy(api, inv, found)
    return StepResult(guest.name, "destroy", "changed", f"destroyed {found.type} {found.vmid}",
                      time.monotonic() - started)


def cleanup_policy(inv: Inventory, guest: Guest) -> Literal["destroy", "report"]:
    return guest.cleanup_on_failure or inv.settings.provision.cleanup_on_failure


def cleanup_guest(api: Any, inv: Inventory, guest: Guest, reason: str) -> StepResult:
    """After a failed creation: destroy the half-made guest, or report it, per inventory.

    Only ever called for a guest this run set out to create; still, only a guest
    with the managed tag, the inventory's name, type and node is destroyed.
    """
    policy = cleanup_policy(inv, guest)
    found = lookup(api, guest)
    if found is None:
        return StepResult(guest.name, "cleanup", "cleanup",
                          f"nothing left behind (Proxmox removed it): {reason}")
    managed = inv.settings.provision.managed_tag
    ours = is_ours(found, guest, managed) and (found.name in ("", guest.name))
    if policy == "report" or not ours:
        why = "cleanup_on_failure: report" if ours else "it does not look like ours"
        return StepResult(guest.name, "cleanup", "failed",
                          f"LEFT FOR CLEANUP: {found.type} {found.vmid} on {found.node} "
                          f"({found.status}) — {why}; creation failed: {reason}")
    logger.warning("%s: creation failed (%s); destroying the half-made guest", guest.name,
                   reason)
    stop_and_destroy(api, inv, found)
    return StepResult(guest.name, "cleanup", "cleanup",
                      f"destroyed half-made {found.type} {found.vmid}: {reason}")
