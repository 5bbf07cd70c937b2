"""Asynchronous PVE tasks: UPIDs, worker threads, task logs and exit status."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


class TaskFailed(Exception):
    """The task ends with ``TASK ERROR: <message>``."""


class TaskInterrupted(Exception):
    """The task was stopped (DELETE /nodes/{node}/tasks/{upid})."""


def make_upid(
    node: str, pid: int, pstart: int, starttime: int, ttype: str, tid: str, user: str
) -> str:
    return f"UPID:{node}:{pid:08X}:{pstart:08X}:{starttime:08X}:{ttype}:{tid}:{user}:"


def parse_upid(upid: str) -> dict[str, Any] | None:
    parts = upid.split(":")
    if len(parts) < 9 or parts[0] != "UPID":
        return None
    try:
        return {
            "node": parts[1],
            "pid": int(parts[2], 16),
            "pstart": int(parts[3], 16),
            "starttime": int(parts[4], 16),
            "type": parts[5],
            "id": parts[6],
            "user": ":".join(parts[7:-1]) if parts[-1] == "" else ":".join(parts[7:]),
        }
    except ValueError:
        return None


class TaskRun:
    """Handle a worker uses to log, wait and learn about injected faults."""

    def __init__(self, manager: TaskManager, record: dict[str, Any], fault: Any) -> None:
        self.manager = manager
        self.record = record
        self.fault = fault  # None, ("fail", msg) or ("hang", None)
        self.stop_event = threading.Event()
        self.warnings = 0

    @property
    def sim(self) -> Simulator:
        return self.manager.sim

    def log(self, line: str) -> None:
        with self.sim.lock:
            self.record["log"].append(line)

    def warn(self, line: str) -> None:
        self.warnings += 1
        self.log(f"WARN: {line}")

    def sleep(self, fraction: float = 1.0) -> None:
        """Spend ``fraction`` of the task duration; hang here if a hang fault applies."""
        if self.fault and self.fault[0] == "hang":
            release = self.sim.faults.release_event
            while not release.is_set():
                if self.stop_event.wait(0.02):
                    raise TaskInterrupted
            self.fault = None
        if self.stop_event.wait(max(0.0, self.sim.task_duration * fraction)):
            raise TaskInterrupted

    def injected_failure(self) -> str | None:
        """The message of a fail fault for this task (consumed once)."""
        if self.fault and self.fault[0] == "fail":
            message = self.fault[1]
            self.fault = None
            return str(message)
        return None

    def check_injected(self) -> None:
        message = self.injected_failure()
        if message is not None:
            raise TaskFailed(message)


Worker = Callable[[TaskRun], None]


class TaskManager:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.runs: dict[str, TaskRun] = {}
        self.threads: list[threading.Thread] = []

    def start(
        self,
        node: str,
        ttype: str,
        tid: str | int,
        user: str,
        worker: Worker,
        *,
        vmid: int | None = None,
        on_error: Callable[[], None] | None = None,
    ) -> str:
        """Register a task and run ``worker`` in a thread; returns the UPID."""
        state = self.sim.state
        with self.sim.lock:
            state["next_pid"] += 1
            pid = state["next_pid"]
            now = int(time.time())
            pstart = int(time.monotonic() * 100) & 0xFFFFFFFF
            upid = make_upid(node, pid, pstart, now, ttype, str(tid), user)
            record: dict[str, Any] = {
                "upid": upid,
                "node": node,
                "pid": pid,
                "pstart": pstart,
                "starttime": now,
                "type": ttype,
                "id": str(tid),
                "user": user,
                "status": "running",
                "log": [],
            }
            state["tasks"].append(record)
            if len(state["tasks"]) > 2000:
                state["tasks"] = [t for t in state["tasks"] if t["status"] == "running"] + [
                    t for t in state["tasks"] if t["status"] != "running"
                ][-1000:]
        fault = self.sim.faults.take_task_fault(ttype, vmid)
        run = TaskRun(self, record, fault)
        self.runs[upid] = run
        thread = threading.Thread(
            target=self._run, args=(run, worker, on_error), name=f"pvesim-{ttype}", daemon=True
        )
        self.threads = [t for t in self.threads if t.is_alive()]
        self.threads.append(thread)
        thread.start()
        return upid

    def _run(self, run: TaskRun, worker: Worker, on_error: Callable[[], None] | None) -> None:
        record = run.record
        exitstatus = "OK"
        try:
            worker(run)
            if run.fault and run.fault[0] == "warn":
                run.warn(str(run.fault[1]))
        except TaskInterrupted:
            exitstatus = "interrupted by signal"
        except TaskFailed as exc:
            exitstatus = str(exc).strip() or "unknown error"
        except Exception as exc:  # a simulator bug must still end the task visibly
            exitstatus = f"simulator internal error: {exc!r}"
        if exitstatus != "OK" and on_error is not None:
            try:
                on_error()
            except Exception as exc:
                run.log(f"cleanup failed: {exc!r}")
        with self.sim.lock:
            if exitstatus == "OK" and run.warnings:
                record["log"].append("")
                record["log"].append(f"TASK WARNINGS: {run.warnings}")
                exitstatus = f"WARNINGS: {run.warnings}"
            elif exitstatus == "OK":
                record["log"].append("TASK OK")
            else:
                record["log"].append("")
                record["log"].append(f"TASK ERROR: {exitstatus}")
            record["status"] = "stopped"
            record["exitstatus"] = exitstatus
            record["endtime"] = int(time.time())
        self.runs.pop(record["upid"], None)
        self.sim.persist()

    def find(self, upid: str) -> dict[str, Any] | None:
        for record in reversed(self.sim.state["tasks"]):
            if record["upid"] == upid:
                return record
        return None

    def stop_task(self, upid: str) -> bool:
        run = self.runs.get(upid)
        if run is None:
            return False
        run.stop_event.set()
        return True

    def shutdown(self, timeout: float = 2.0) -> None:
        for run in list(self.runs.values()):
            run.stop_event.set()
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
