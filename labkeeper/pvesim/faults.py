"""Fault injection: failing/hanging tasks, API 5xx, latency, full storages."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

STORAGE_FULL_MESSAGE = "No space left on device"


@dataclass
class _TaskFault:
    task_type: str
    count: int
    message: str | None = None  # None = hang
    vmid: int | None = None
    kind: str = "fail"  # fail | hang | warn


@dataclass
class Faults:
    """Thread-safe fault switches, shared by the HTTP API and Python callers.

    ``sim.faults.fail_tasks("vzdump", message="...", count=1)`` — the next
    matching task fails with the message (vzdump: per guest, job ends with
    ``job errors``). ``sim.faults.hang_tasks("vzstart")`` — the next matching
    task stays ``running`` until :meth:`clear` (or the task is stopped).
    ``sim.faults.api_errors(503, count=2)`` — the next requests answer 503.
    ``sim.faults.latency(0.5)`` — every request waits that long first.
    ``sim.faults.storage_full("local")`` — writes to that storage fail.
    """

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _tasks: list[_TaskFault] = field(default_factory=list)
    _api: list[list[Any]] = field(default_factory=list)  # [status, count, message]
    _latency: float = 0.0
    _full: set[tuple[str, str | None]] = field(default_factory=set)
    _release: threading.Event = field(default_factory=threading.Event)

    # ------------------------------------------------------------ setters
    def fail_tasks(
        self, task_type: str, message: str, count: int = 1, vmid: int | None = None
    ) -> None:
        with self._lock:
            self._tasks.append(_TaskFault(task_type, count, message, vmid))

    def hang_tasks(self, task_type: str, count: int = 1, vmid: int | None = None) -> None:
        with self._lock:
            self._release.clear()
            self._tasks.append(_TaskFault(task_type, count, None, vmid, kind="hang"))

    def warn_tasks(self, task_type: str, message: str, count: int = 1,
                   vmid: int | None = None) -> None:
        """The next matching task succeeds with a warning (``WARNINGS: n``)."""
        with self._lock:
            self._tasks.append(_TaskFault(task_type, count, message, vmid, kind="warn"))

    def api_errors(self, status: int = 503, count: int = 1, message: str | None = None) -> None:
        if status not in (500, 502, 503, 504):
            raise ValueError("api_errors status must be 500, 502, 503 or 504")
        text = message or {
            500: "Internal Server Error",
            502: "Bad Gateway",
            503: "Service Unavailable",
            504: "Gateway Timeout",
        }[status]
        with self._lock:
            self._api.append([status, count, text])

    def latency(self, seconds: float) -> None:
        with self._lock:
            self._latency = max(0.0, float(seconds))

    def storage_full(self, storage: str, node: str | None = None, full: bool = True) -> None:
        with self._lock:
            if full:
                self._full.add((storage, node))
            else:
                self._full.discard((storage, node))

    def clear(self) -> None:
        """Remove every fault and release hanging tasks."""
        with self._lock:
            self._tasks.clear()
            self._api.clear()
            self._latency = 0.0
            self._full.clear()
            self._release.set()

    # ------------------------------------------------------------ queries
    def take_task_fault(self, task_type: str, vmid: int | None) -> tuple[str, str | None] | None:
        """Consume a matching task fault: ("fail", message) or ("hang", None)."""
        with self._lock:
            for fault in self._tasks:
                if fault.task_type != task_type or fault.count <= 0:
                    continue
                if fault.vmid is not None and fault.vmid != vmid:
                    continue
                fault.count -= 1
                self._tasks = [f for f in self._tasks if f.count > 0]
                return (fault.kind, fault.message)
        return None

    def take_api_error(self) -> tuple[int, str] | None:
        with self._lock:
            for entry in self._api:
                if entry[1] > 0:
                    entry[1] -= 1
                    status, message = entry[0], entry[2]
                    self._api = [e for e in self._api if e[1] > 0]
                    return status, message
        return None

    def current_latency(self) -> float:
        with self._lock:
            return self._latency

    def is_full(self, storage: str, node: str) -> bool:
        with self._lock:
            return (storage, None) in self._full or (storage, node) in self._full

    @property
    def release_event(self) -> threading.Event:
        return self._release

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tasks": [
                    {
                        "kind": f.kind,
                        "task_type": f.task_type,
                        "count": f.count,
                        "message": f.message,
                        "vmid": f.vmid,
                    }
                    for f in self._tasks
                ],
                "api_errors": [
                    {"status": s, "count": c, "message": m} for s, c, m in self._api
                ],
                "latency": self._latency,
                "storage_full": [{"storage": s, "node": n} for s, n in sorted(
                    self._full, key=lambda x: (x[0], x[1] or "")
                )],
            }

    def apply(self, spec: dict[str, Any]) -> None:
        """Add a fault from an HTTP request body (``kind`` selects which)."""
        kind = spec.get("kind")
        count = int(spec.get("count", 1))
        vmid = int(spec["vmid"]) if spec.get("vmid") not in (None, "") else None
        if kind == "task-fail":
            self.fail_tasks(str(spec["type"]), str(spec.get("message", "simulated failure")),
                            count, vmid)
        elif kind == "task-hang":
            self.hang_tasks(str(spec["type"]), count, vmid)
        elif kind == "task-warn":
            self.warn_tasks(str(spec["type"]), str(spec.get("message", "simulated warning")),
                            count, vmid)
        elif kind == "api-error":
            self.api_errors(int(spec.get("status", 503)), count, spec.get("message"))
        elif kind == "latency":
            self.latency(float(spec.get("seconds", 0)))
        elif kind == "storage-full":
            full = str(spec.get("full", "1")).lower() not in ("0", "false", "no", "off")
            self.storage_full(str(spec["storage"]), spec.get("node") or None, full)
        else:
            raise ValueError(
                "kind must be one of task-fail, task-hang, task-warn, api-error, latency, "
                "storage-full"
            )
