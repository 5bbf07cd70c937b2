"""Scratch copies of guests: how a drill marks them, and the sweep of those a dead drill left.

Every copy is marked *in the restore call itself* (tag ``labkeeper-drill`` and a
description ending in ``labkeeper-drill-scratch created=<UTC time>``), so even a drill
killed mid-restore leaves a marked guest. The sweep destroys only guests of the
scratch VMID range (never an inventory guest) carrying the tag *and* the marker and
older than ``stale_scratch_hours`` (a younger one may belong to a drill still
running); copies tagged ``labkeeper-drill-kept`` are reported, never destroyed.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from labkeeper.drill.result import DrillResult
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Guest, Inventory

logger = logging.getLogger(__name__)

SCRATCH_TAG = "labkeeper-drill"
"""Tag of every scratch copy a guest drill restores (set in the restore call)."""
KEPT_TAG = "labkeeper-drill-kept"
"""Added to a failed drill's copy kept for inspection: never swept."""

_MARKER = "labkeeper-drill-scratch"
_MARKER_RE = re.compile(_MARKER + r" created=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")

# =====================================================================================
# the marker (pure)
# =====================================================================================


def scratch_description(guest: Guest, volid: str, created: datetime) -> str:
    """The description a scratch copy gets *in the restore call itself* (so even a
    drill that dies during the restore leaves a marked guest); the last line is the
    marker :func:`marker_created` reads."""
    return (f"labkeeper DR drill of {guest.name} ({guest.vmid}) from {volid}: scratch "
            f"copy, safe to destroy.\n"
            f"{_MARKER} created={created.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}")


def marker_created(description: str) -> datetime | None:
    """When labkeeper created this scratch copy, or None when it carries no marker."""
    found = _MARKER_RE.search(description or "")
    if found is None:
        return None
    return datetime.strptime(found.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def scratch_restore_options(guest: Guest, volid: str, created: datetime) -> dict[str, Any]:
    """Config given with the restore: the marker (tag + description), never started
    on boot, no protection (inherited from the original, it would block the
    cleanup), and only the drill's tag (the original's tags would let tag-selected
    backup jobs or updates pick the copy up)."""
    return {"tags": SCRATCH_TAG, "description": scratch_description(guest, volid, created),
            "onboot": 0, "protection": 0}


SweepDecision = Literal["destroy", "young", "kept", "unmarked"]


def sweep_decision(description: str, tags: Sequence[str], *, now: datetime,
                   stale_after_s: float) -> tuple[SweepDecision, datetime | None]:
    """What to do with a ``labkeeper-drill``-tagged guest of the scratch range."""
    created = marker_created(description)
    if created is None:
        return "unmarked", None
    if KEPT_TAG in tags:
        return "kept", created
    if (now - created).total_seconds() < stale_after_s:
        return "young", created
    return "destroy", created


# =====================================================================================
# sweep and destroy (side effects; ``px`` is labkeeper.proxmox)
# =====================================================================================


def sweep_scratch(px: Any, api: Any, inv: Inventory, result: DrillResult, *, now: datetime,
                  poll: float) -> list[int]:
    """Destroy the scratch copies dead drills left behind: guests of the scratch range
    (never an inventory guest) tagged ``labkeeper-drill`` *and* carrying labkeeper's
    description marker, older than ``stale_scratch_hours``, not kept on purpose.
    Returns the VMIDs destroyed; reports everything it saw."""
    settings = inv.drills.guests
    rng = settings.scratch_vmids
    mine = {g.vmid for g in inv.guests}
    destroyed: list[int] = []
    failed: list[str] = []
    for g in px.list_guests(api):
        if g.vmid not in rng or g.vmid in mine or SCRATCH_TAG not in g.tags:
            continue
        config = px.guest_config(api, g.node, g.vmid, g.type)
        decision, created = sweep_decision(str(config.values.get("description", "")),
                                           [*g.tags, *config.tags], now=now,
                                           stale_after_s=settings.stale_scratch_hours * 3600)
        when = created.isoformat(timespec="seconds") if created else ""
        if decision != "destroy":
            result.notes.append(_left_alone_note(decision, g.vmid, g.node, when))
            continue
        try:
            destroy_guest(px, api, g.node, g.vmid, g.type, running=g.status == "running",
                          poll=poll)
        except LabkeeperError as exc:
            failed.append(f"VMID {g.vmid} on {g.node}: {exc}")
            continue
        destroyed.append(g.vmid)
        logger.info("destroyed scratch copy VMID %s on %s left by a drill that died (%s)",
                    g.vmid, g.node, when)
    if destroyed or failed:
        detail = "; ".join(
            ([f"destroyed VMID {', '.join(map(str, destroyed))} (left by drills that died)"]
             if destroyed else [])
            + [f"could not destroy {f}" for f in failed])
        result.check("leftover scratch guests", not failed, detail)
    return destroyed


def _left_alone_note(decision: SweepDecision, vmid: int, node: str, when: str) -> str:
    if decision == "unmarked":
        return (f"VMID {vmid} is tagged {SCRATCH_TAG} but has no labkeeper marker in its "
                "description: left alone")
    if decision == "kept":
        return (f"scratch copy VMID {vmid} on {node} was kept from a failed drill ({when}): "
                "destroy it when you are done")
    return (f"scratch copy VMID {vmid} on {node} was created {when}, maybe by a drill still "
            "running: left alone")


def destroy_guest(px: Any, api: Any, node: str, vmid: int, gtype: str, *, running: bool,
                  poll: float) -> None:
    if running:
        px.wait_for_task(api, px.stop_guest(api, node, vmid, gtype), timeout=300,
                         max_poll=poll)
    px.wait_for_task(api, px.destroy_guest(api, node, vmid, gtype, purge=True), timeout=600,
                     max_poll=poll)


def destroy_scratch(px: Any, api: Any, inv: Inventory, vmid: int, result: DrillResult, *,
                    poll: float) -> None:
    """Destroy this drill's scratch copy (only ever a VMID of the scratch range)."""
    rng = inv.drills.guests.scratch_vmids
    if vmid not in rng or vmid in {g.vmid for g in inv.guests}:
        raise AssertionError(f"refusing to destroy VMID {vmid}: not a scratch VMID")
    try:
        found = px.find_guest(api, vmid)
        if found is None:
            result.notes.append(f"scratch VMID {vmid} does not exist (restore cleaned up)")
            return
        destroy_guest(px, api, found.node, vmid, found.type,
                      running=found.status == "running", poll=poll)
        result.notes.append(f"scratch guest {vmid} destroyed")
    except LabkeeperError as exc:
        result.fail(f"could not destroy scratch guest {vmid}: {exc}")
