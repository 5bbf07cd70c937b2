"""The per-node schedule of a vzdump run: nodes in parallel, at most ``max_per_node``
vzdumps at a time on each, a locked guest tried again later in the run.

A feeder thread per node takes the node's guests in order and submits one backup
per guest (the caller's ``submit``: a Prefect task run); the next is submitted as soon
as the previous one holds a slot (:class:`~labkeeper.vzdump.plan.NodeSlot`) or ended
without needing one, so it is ready — task run created, lock and "already done"
checks made — and starts its vzdump the moment a slot frees. The caller's ``judge``
sees each ended backup in the calling thread and may ask for a later retry.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from labkeeper import log_setup
from labkeeper.vzdump.plan import NodeSlot, Target


class Future(Protocol):
    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...


Submit = Callable[[Target, int, NodeSlot], Future]
"""Start one guest's backup (attempt n, holding the node's slot while vzdump runs)."""
Judge = Callable[[Target, int, Any], float | None]
"""A backup ended (its future, or the exception ``submit`` raised): seconds after which
to try the guest again, or None when it is settled."""


@dataclass
class _NodeQueue:
    """One node's guests to back up, its vzdump slots and the guests still in flight.

    ``active`` counts guests taken and not yet judged (a locked one may still come
    back via :meth:`defer`).
    """

    node: str
    pending: deque[tuple[Target, int]]
    slots: threading.Semaphore
    deferred: list[tuple[float, Target, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0

    def take(self) -> tuple[Target, int] | float | None:
        """The next guest, seconds to wait (a deferred guest is not due yet, or a
        guest in flight may still be deferred), or None when the node is done."""
        with self.lock:
            if self.pending:
                self.active += 1
                return self.pending.popleft()
            if self.deferred:
                self.deferred.sort(key=lambda d: d[0])
                due, target, attempt = self.deferred[0]
                wait = due - time.monotonic()
                if wait <= 0:
                    self.deferred.pop(0)
                    self.active += 1
                    return target, attempt
                return min(0.2, wait)
            return None if self.active == 0 else 0.05

    def done(self) -> None:
        with self.lock:
            self.active -= 1

    def defer(self, target: Target, attempt: int, delay: float) -> None:
        with self.lock:
            self.deferred.append((time.monotonic() + delay, target, attempt))


Ended = tuple[_NodeQueue, Target, int, Any]


def _feed(nq: _NodeQueue, submit: Submit, ended: queue.Queue[Ended],
          slot_wait: float) -> None:
    """A node's feeder thread: submit its guests one after the other (see above)."""
    while True:
        item = nq.take()
        if item is None:
            return
        if isinstance(item, float):
            time.sleep(item)
            continue
        target, attempt = item
        slot = NodeSlot(nq.node, nq.slots, wait_timeout=slot_wait)
        try:
            fut = submit(target, attempt, slot)
        except Exception as exc:  # it could not even start: that guest failed
            ended.put((nq, target, attempt, exc))
            continue

        def _ended(f: Any, nq: _NodeQueue = nq, target: Target = target,
                   attempt: int = attempt, slot: NodeSlot = slot) -> None:
            slot.give_up()
            ended.put((nq, target, attempt, f))

        fut.add_done_callback(_ended)
        slot.handoff.wait()


def run_per_node(queues: Mapping[str, Sequence[Target]], max_per_node: int, *,
                 submit: Submit, judge: Judge, slot_wait: float) -> None:
    """Back up every queue's guests (see the module docstring); returns when every
    guest is judged settled. ``slot_wait``: how long a backup may wait for a slot."""
    ended: queue.Queue[Ended] = queue.Queue()
    feeders: list[threading.Thread] = []
    for node, targets in queues.items():
        nq = _NodeQueue(node, deque((t, 1) for t in targets),
                        threading.BoundedSemaphore(max_per_node))
        # the feeder submits inside the caller's run
        th = threading.Thread(target=log_setup.in_context(_feed),
                              args=(nq, submit, ended, slot_wait),
                              name=f"vzdump-{node}", daemon=True)
        th.start()
        feeders.append(th)
    while any(th.is_alive() for th in feeders) or not ended.empty():
        try:
            nq, target, attempt, outcome = ended.get(timeout=0.1)
        except queue.Empty:
            continue
        try:
            delay = judge(target, attempt, outcome)
            if delay is not None:
                nq.defer(target, attempt + 1, delay)
        finally:
            nq.done()
