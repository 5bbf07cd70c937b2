"""PVE tasks: list them, stop one, read its status and log, and wait until it ends.

:func:`wait_for_task` is the one place that waits on a task: it polls with backoff,
rides out transient API errors until its deadline, and turns the exit status into a
:class:`TaskResult` (``OK`` / ``WARNINGS: n``) or a :class:`ProxmoxTaskError`
carrying the (redacted) log tail.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from labkeeper.errors import ServiceError
from labkeeper.proxmox.client import list_op, send
from labkeeper.proxmox.errors import ProxmoxTaskError, ProxmoxTaskTimeout, lock_name
from labkeeper.proxmox.models import TaskStatus, TaskSummary, Upid, parse_upid
from labkeeper.proxmox.request import ApiRequest, api_request
from labkeeper.secrets import redact


def tasks_request(node: str, *, vmid: int | None = None, typefilter: str | None = None,
                  source: Literal["archive", "active", "all"] | None = None,
                  errors: bool | None = None, since: int | None = None,
                  start: int | None = None, limit: int | None = None) -> ApiRequest:
    params = {"vmid": vmid, "typefilter": typefilter, "source": source, "errors": errors,
              "since": since, "start": start, "limit": limit}
    return api_request("GET", "/nodes/{node}/tasks", params, node=node)


def task_status_request(upid: Upid) -> ApiRequest:
    return api_request("GET", "/nodes/{node}/tasks/{upid}/status", node=upid.node,
                       upid=upid.raw)


def task_log_request(upid: Upid, *, start: int = 0, limit: int = 500) -> ApiRequest:
    return api_request("GET", "/nodes/{node}/tasks/{upid}/log", {"start": start, "limit": limit},
                       node=upid.node, upid=upid.raw)


def stop_task_request(upid: Upid) -> ApiRequest:
    """Stop a running task: ``DELETE /nodes/{node}/tasks/{upid}``."""
    return api_request("DELETE", "/nodes/{node}/tasks/{upid}", node=upid.node, upid=upid.raw)


list_tasks = list_op(tasks_request, TaskSummary)


def stop_task(api: Any, upid: Upid | str) -> None:
    """Stop a running task (it then ends with ``interrupted by signal``)."""
    send(api, stop_task_request(upid if isinstance(upid, Upid) else parse_upid(upid)))


def classify_exitstatus(exitstatus: str | None) -> tuple[bool, int]:
    """(success, warnings): ``OK`` → (True, 0); ``WARNINGS: n`` → (True, n); else failure."""
    text = (exitstatus or "").strip()
    if text == "OK":
        return True, 0
    match = re.fullmatch(r"WARNINGS: (\d+)", text)
    if match:
        return True, int(match.group(1))
    return False, 0


def poll_delays(start: float = 0.2, cap: float = 5.0, factor: float = 1.5) -> Iterator[float]:
    """Backoff between status polls: start, start*factor, ... capped at ``cap``."""
    delay = start
    while True:
        yield min(delay, cap)
        delay = min(delay * factor, cap)


@dataclass(frozen=True)
class TaskResult:
    upid: Upid
    status: str
    exitstatus: str
    ok: bool
    warnings: int
    duration: float
    log: tuple[str, ...]

    def tail(self, lines: int = 20) -> tuple[str, ...]:
        return self.log[-lines:]


def task_status(api: Any, upid: Upid | str) -> TaskStatus:
    upid = upid if isinstance(upid, Upid) else parse_upid(upid)
    return TaskStatus.model_validate(send(api, task_status_request(upid)))


def task_log(api: Any, upid: Upid | str, *, page: int = 500) -> list[str]:
    """Every log line of a task (PVE returns 50 by default: page with start/limit)."""
    upid = upid if isinstance(upid, Upid) else parse_upid(upid)
    lines: list[str] = []
    start = 0
    while True:
        chunk = send(api, task_log_request(upid, start=start, limit=page)) or []
        lines.extend(str(item.get("t", "")) for item in chunk)
        if len(chunk) < page:
            break
        start += len(chunk)
    if lines == ["no content"]:
        return []
    return lines


def _task_failed_transient(exitstatus: str, tail: Sequence[str]) -> bool:
    text = "\n".join([exitstatus, *tail])
    return lock_name(text) is not None or "can't acquire lock" in text


def task_result(upid: Upid, status: TaskStatus, log: Sequence[str],
                duration: float) -> TaskResult:
    """Pure: the result of a stopped task, or raise :class:`ProxmoxTaskError`."""
    exitstatus = status.exitstatus or "unexpected status"
    ok, warnings = classify_exitstatus(exitstatus)
    result = TaskResult(upid, status.status, exitstatus, ok, warnings, duration,
                        tuple(redact(line) for line in log))
    if not ok:
        tail = result.tail(20)
        shown = "; ".join(line for line in tail[-8:] if line.strip())
        raise ProxmoxTaskError(
            redact(f"proxmox task {upid.type} {upid.id} on {upid.node} failed: {exitstatus}"
                   f" (UPID {upid.raw}); log tail: {shown}"),
            upid=upid.raw, exitstatus=redact(exitstatus), log_tail=tail,
            transient=_task_failed_transient(exitstatus, tail))
    return result


def wait_for_task(api: Any, upid: Upid | str, *, timeout: float, poll: float = 0.2,
                  max_poll: float = 5.0,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> TaskResult:
    """Poll a task until it stops; return its result (``OK``/``WARNINGS: n``) or raise.

    Raises :class:`ProxmoxTaskError` (exit status + log tail) when the task failed,
    :class:`ProxmoxTaskTimeout` (a :class:`~labkeeper.errors.TaskTimeout`) when it is
    still running after ``timeout`` seconds. Transient API errors while polling
    (503, a reset connection) are ridden out until the deadline.
    """
    upid = upid if isinstance(upid, Upid) else parse_upid(upid)
    started = clock()
    deadline = started + timeout
    delays = poll_delays(poll, max_poll)
    last_error: ServiceError | None = None
    while True:
        try:
            status = task_status(api, upid)
            last_error = None
        except ServiceError as exc:
            if not exc.transient:
                raise
            status, last_error = None, exc
        if status is not None and status.status == "stopped":
            log = task_log(api, upid)
            return task_result(upid, status, log, clock() - started)
        now = clock()
        if now >= deadline:
            why = f" (last poll: {last_error})" if last_error else ""
            raise ProxmoxTaskTimeout(
                f"proxmox task {upid.type} {upid.id} on {upid.node} still running after "
                f"{timeout:g}s; it may still be running — UPID {upid.raw}{why}",
                upid=upid.raw, timeout=timeout)
        sleep(max(0.0, min(next(delays), deadline - now)))
