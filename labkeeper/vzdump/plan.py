"""Which guests a vzdump job backs up, and in which order: the selection resolved
against ``/cluster/resources`` at run time (a guest tagged yesterday is in), per-node
queues, and a node's vzdump slots (:class:`NodeSlot`, held only while the PVE task
runs). Errors of a guest backup live here too.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, PermanentError, TaskTimeout
from labkeeper.inventory import Inventory, PruneRetention, Selection, VzdumpJob

# ====================================================================== errors


class VerificationFailed(PermanentError):
    """vzdump said OK but the archive does not look like a good backup."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class VzdumpTimedOut(PermanentError):
    """The vzdump task ran past the job's timeout and was stopped (not retried:
    a second attempt would wait just as long)."""


# ====================================================================== selection


@dataclass(frozen=True)
class Target:
    """One guest to back up, as ``/cluster/resources`` showed it at selection time."""

    vmid: int
    node: str
    type: px.GuestType
    name: str = ""
    lock: str | None = None

    @property
    def label(self) -> str:
        return f"{self.vmid} ({self.name})" if self.name else str(self.vmid)


@dataclass(frozen=True)
class Resolved:
    targets: tuple[Target, ...]
    missing: tuple[int, ...] = ()
    """Explicitly selected vmids the cluster does not have (reported as failures)."""
    warnings: tuple[str, ...] = ()


def job_for(inv: Inventory, job: str | None, selection: dict[str, Any] | None,
            storage: str | None) -> VzdumpJob:
    """The inventory job (optionally with an ad-hoc selection), or an ad-hoc job."""
    if job is not None:
        base = inv.vzdump_job(job)
        if selection is None and storage is None:
            return base
        update: dict[str, Any] = {}
        if selection is not None:
            update["selection"] = Selection.model_validate(selection)
        if storage is not None:
            update["storage"] = storage
        return base.model_copy(update=update)
    if selection is None or storage is None:
        raise ConfigError("give a vzdump job name, or an ad-hoc selection and a storage")
    return VzdumpJob(name="ad-hoc", selection=Selection.model_validate(selection),
                     storage=storage, retention=PruneRetention(keep_all=True),
                     schedule="0 0 * * *")


def resolve_selection(selection: Selection, cluster: Iterable[px.Guest],
                      inventory_vmids: Mapping[str, int] | None = None) -> Resolved:
    """Which guests ``selection`` covers in ``cluster`` (pure).

    ``all``, or the union of ``vmids``, ``guests`` (inventory names → vmids),
    ``tags`` (any of) and ``pool``; limited to ``node``; minus ``exclude`` and
    ``exclude_tags``. With only ``node`` set: every guest on that node.
    """
    guests = {g.vmid: g for g in cluster}
    names = dict(inventory_vmids or {})
    explicit: list[int] = list(selection.vmids)
    warnings: list[str] = []
    for name in selection.guests:
        if name in names:
            explicit.append(names[name])
        else:
            warnings.append(f"guest {name!r} is not in the inventory")
    picked_anything = bool(selection.vmids or selection.guests or selection.tags
                           or selection.pool)
    chosen: set[int] = set()
    if selection.all or not picked_anything:
        chosen = set(guests)
    else:
        chosen.update(v for v in explicit if v in guests)
        if selection.tags:
            chosen.update(g.vmid for g in guests.values() if set(selection.tags) & set(g.tags))
        if selection.pool:
            chosen.update(g.vmid for g in guests.values() if g.pool == selection.pool)
    excluded = set(selection.exclude)
    if selection.exclude_tags:
        excluded.update(g.vmid for g in guests.values()
                        if set(selection.exclude_tags) & set(g.tags))
    if selection.node:
        chosen = {v for v in chosen if guests[v].node == selection.node}
    chosen -= excluded
    missing = sorted({v for v in explicit if v not in guests and v not in excluded})
    targets = tuple(Target(v, guests[v].node, guests[v].type, guests[v].name, guests[v].lock)
                    for v in sorted(chosen))
    if not targets and not missing:
        warnings.append("the selection matched no guest in the cluster")
    for vmid in missing:
        warnings.append(f"vmid {vmid} is selected but not in the cluster")
    return Resolved(targets, tuple(missing), tuple(warnings))


def inventory_vmids(inv: Inventory) -> dict[str, int]:
    return {g.name: g.vmid for g in inv.guests}


def resolve(api: Any, inv: Inventory, job: VzdumpJob) -> Resolved:
    """Resolve ``job``'s selection against the cluster now (one API call)."""
    return resolve_selection(job.selection, px.list_guests(api), inventory_vmids(inv))


# ====================================================================== plan


def node_queues(targets: Iterable[Target]) -> dict[str, list[Target]]:
    """Per-node queues in vmid order (nodes sorted by name)."""
    out: dict[str, list[Target]] = {}
    for t in sorted(targets, key=lambda t: (t.node, t.vmid)):
        out.setdefault(t.node, []).append(t)
    return out


def ideal_makespan(targets: Iterable[Target], duration: float, max_per_node: int = 1) -> float:
    """The schedule's lower bound: the busiest node's ``ceil(n / max_per_node) * duration``."""
    queues = node_queues(targets)
    if not queues:
        return 0.0
    return max(math.ceil(len(q) / max_per_node) for q in queues.values()) * duration


def timeout_seconds(job: VzdumpJob) -> float:
    return float(job.timeout_minutes) * 60


POLL_FRACTION = 0.03
POLL_FLOOR = 0.03


def proportional_sleep(*, fraction: float = POLL_FRACTION, floor: float = POLL_FLOOR,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> Callable[[float], None]:
    """A ``sleep`` for :func:`labkeeper.proxmox.wait_for_task`: between two status polls
    wait at most ``fraction`` of the time the task has been watched so far (and at
    least ``floor``); the adapter's backoff, capped by ``poll_max``, still bounds it
    from above. A task that runs T seconds is noticed within about ``fraction * T``
    of its end — a node's next vzdump then starts without a poll interval's delay,
    while a long backup is polled no more often than the cap allows."""
    started = clock()

    def _sleep(delay: float) -> None:
        sleep(max(0.0, min(delay, max(floor, fraction * (clock() - started)))))

    return _sleep


class NodeSlot:
    """A claim on one of a node's vzdump slots (``threading.Semaphore(max_per_node)``),
    for one guest. :func:`backup_guest` holds it (``with slot:``) only from starting
    the vzdump (or adopting a running one) until the PVE task has ended — the
    node's next guest can start while this one is verified, pruned and copied.

    ``handoff`` is set once the slot was taken (or :meth:`give_up` is called when
    the guest ends without needing it): the node's feeder then prepares the next
    guest, which waits here for the slot. Entering again (a retried attempt)
    waits for a slot again, so the limit holds for retries too.
    """

    def __init__(self, node: str, slots: threading.Semaphore, *,
                 wait_timeout: float | None = None) -> None:
        self.node = node
        self.slots = slots
        self.wait_timeout = wait_timeout
        self.handoff = threading.Event()

    def __enter__(self) -> NodeSlot:
        if not self.slots.acquire(timeout=self.wait_timeout):
            self.handoff.set()
            raise TaskTimeout(f"no vzdump slot free on node {self.node} after "
                              f"{self.wait_timeout:g}s")
        self.handoff.set()
        return self

    def __exit__(self, *exc: object) -> None:
        self.slots.release()

    def give_up(self) -> None:
        """This guest will not take the slot (locked, already done, failed early)."""
        self.handoff.set()

    def __repr__(self) -> str:  # shown in Prefect's task parameters
        return f"NodeSlot({self.node})"
