"""Bring an existing guest of ours to its declared state: options, disk growth, running,
protection. Restarts only with ``allow_restart``; a protected guest is never modified."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from labkeeper import proxmox as px
from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.desired import merged_net, normalise
from labkeeper.provision.diff import config_changes
from labkeeper.provision.errors import ProvisionError
from labkeeper.provision.plan import Change, short_value
from labkeeper.provision.steps import (
    StepResult,
    StepStatus,
    check_ours,
    lookup,
    read_guest,
    wait_task,
)

logger = logging.getLogger(__name__)


def converge_guest(api: Any, inv: Inventory, guest: Guest, *, allow_restart: bool = False
                   ) -> StepResult:
    """Apply option changes and disk growth; restart only with ``allow_restart``.

    Re-reads the guest first (the plan may be stale). Protected guests and
    refused changes (shrink, storage move) are never applied.
    """
    started = time.monotonic()
    managed = inv.settings.provision.managed_tag
    found, config = read_guest(api, guest)
    found = check_ours(found, guest, managed, "configure")
    if normalise(config.get("protection")) == "1":
        return StepResult(guest.name, "configure", "skipped",
                          "protection=1: labkeeper does not modify it")
    running = found.status == "running"
    changes = config_changes(guest, managed, config, running=running)
    options = {c.key: merged_net(guest.type, config.get(c.key), c.new)
               if c.key.startswith("net") and c.new else c.new
               for c in changes if c.kind == "set" and (allow_restart or not c.needs_restart)}
    deletes = [c.key for c in changes if c.kind == "delete"]
    held = [c.key for c in changes if c.kind == "set" and c.needs_restart and not allow_restart]
    refused = [c for c in changes if c.kind == "refused"]
    done = _set_and_grow(api, inv, guest, config, changes, options, deletes)
    restarted = running and allow_restart and any(
        c.needs_restart for c in changes if c.key in options)
    if restarted:
        logger.info("%s: restarting to apply %s", guest.name, ", ".join(k for k in options))
        wait_task(api, px.shutdown_guest(api, guest.node, guest.vmid, guest.type, timeout=120,
                                         force_stop=True), inv)
        wait_task(api, px.start_guest(api, guest.node, guest.vmid, guest.type), inv)
    parts = _outcome(done, restarted, held, refused)
    status: StepStatus = "changed" if done else ("held" if held else "unchanged")
    if refused:
        raise ProvisionError(f"{guest.name}: " + "; ".join(parts))
    return StepResult(guest.name, "configure", status, "; ".join(parts) or "as declared",
                      time.monotonic() - started)


def _set_and_grow(api: Any, inv: Inventory, guest: Guest, config: Mapping[str, Any],
                  changes: Sequence[Change], options: Mapping[str, Any],
                  deletes: Sequence[str]) -> list[str]:
    """Send the option changes in one config update, then grow disks; what was done."""
    done: list[str] = []
    if options or deletes:
        px.configure(api, guest.node, guest.vmid, guest.type, options, delete=deletes,
                     digest=str(config.get("digest") or "") or None)
        done += [f"{k}={short_value(k, v)}" for k, v in options.items()] + [
            f"-{k}" for k in deletes]
    for c in changes:
        if c.kind != "grow":
            continue
        assert c.new is not None
        logger.info("%s: growing %s %s → %s", guest.name, c.key, c.old, c.new)
        wait_task(api, px.resize_disk(api, guest.node, guest.vmid, guest.type, c.key, c.new), inv)
        done.append(f"{c.key} {c.old}→{c.new}")
    return done


def _outcome(done: Sequence[str], restarted: bool, held: Sequence[str],
             refused: Sequence[Change]) -> list[str]:
    parts = []
    if done:
        parts.append("set " + ", ".join(done))
    if restarted:
        parts.append("restarted")
    if held:
        parts.append(f"held (needs --allow-restart): {', '.join(held)}")
    if refused:
        parts.append("refused: " + "; ".join(f"{c.key} {c.note}" for c in refused))
    return parts


def start_guest(api: Any, inv: Inventory, guest: Guest) -> StepResult:
    started = time.monotonic()
    managed = inv.settings.provision.managed_tag
    found = check_ours(lookup(api, guest), guest, managed, "start")
    if found.status == "running":
        return StepResult(guest.name, "start", "unchanged", "running")
    logger.info("%s: starting %s %s", guest.name, guest.type, guest.vmid)
    wait_task(api, px.start_guest(api, guest.node, guest.vmid, guest.type), inv)
    return StepResult(guest.name, "start", "changed", "started", time.monotonic() - started)


def protect_guest(api: Any, inv: Inventory, guest: Guest) -> StepResult:
    """Set ``protection=1`` last (a protected guest could not be cleaned up)."""
    if not guest.protection:
        return StepResult(guest.name, "protect", "skipped", "not asked for")
    found, config = read_guest(api, guest)
    check_ours(found, guest, inv.settings.provision.managed_tag, "protect")
    if normalise(config.get("protection")) == "1":
        return StepResult(guest.name, "protect", "unchanged", "protection=1")
    px.configure(api, guest.node, guest.vmid, guest.type, {"protection": 1})
    return StepResult(guest.name, "protect", "changed", "protection=1")
