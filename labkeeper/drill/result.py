"""What a drill reports: its checks, RPO and RTO against their objectives, pass or fail.

Every drill (database, guest, repository, paths, pitr) fills one :class:`DrillResult`
and never raises for a drill that *failed*; :class:`DrillFailed` exists only for the
task wrappers, to make Prefect retry a failure marked ``transient``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from labkeeper.errors import LabkeeperError
from labkeeper.secrets import redact

STALL_TIMEOUT = 300.0
"""Seconds a stream out of restic may stay silent before the drill gives up."""


@dataclass
class Check:
    """One thing a drill verified."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class DrillResult:
    """What one drill did. ``status`` is ``passed`` only when every check passed, no
    error happened and no objective was breached."""

    kind: str  # database | guest | repository | paths
    target: str
    started_at: datetime = field(default_factory=lambda: datetime.now(tz=UTC))
    checks: list[Check] = field(default_factory=list)
    rpo_s: float | None = None
    rpo_objective_s: float | None = None
    rto_s: float | None = None
    rto_objective_s: float | None = None
    source: str = ""
    """What was restored: a snapshot id, an archive volid."""
    scratch: str = ""
    """Where it was restored: a scratch database, a scratch VMID."""
    kept: str = ""
    """Set when the scratch copy was kept (keep_on_failure): where it is."""
    error: str = ""
    transient: bool = False
    notes: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, redact(detail)))
        return ok

    def fail(self, message: str, *, transient: bool = False) -> None:
        message = redact(message)
        self.error = f"{self.error}; {message}" if self.error else message
        self.transient = self.transient or transient

    @property
    def rpo_breached(self) -> bool:
        return (self.rpo_s is not None and self.rpo_objective_s is not None
                and self.rpo_s > self.rpo_objective_s)

    @property
    def rto_breached(self) -> bool:
        return (self.rto_s is not None and self.rto_objective_s is not None
                and self.rto_s > self.rto_objective_s)

    @property
    def breaches(self) -> list[str]:
        out = []
        if self.rpo_breached:
            out.append(f"RPO {dur(self.rpo_s)} > objective {dur(self.rpo_objective_s)}")
        if self.rto_breached:
            out.append(f"RTO {dur(self.rto_s)} > objective {dur(self.rto_objective_s)}")
        return out

    @property
    def failed_checks(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def passed(self) -> bool:
        return not self.error and not self.failed_checks and not self.breaches

    @property
    def status(self) -> str:
        return "passed" if self.passed else "failed"

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}"

    def summary(self) -> str:
        """One line: why it failed, or what passed."""
        if self.passed:
            return f"{len(self.checks)} check(s) passed"
        parts = []
        if self.error:
            parts.append(self.error)
        parts += [f"{c.name}: {c.detail}" for c in self.failed_checks]
        parts += self.breaches
        return redact("; ".join(parts))

    def row(self) -> dict[str, Any]:
        return {
            "drill": self.kind, "target": self.target, "status": self.status,
            "rpo": dur(self.rpo_s), "rpo objective": dur(self.rpo_objective_s),
            "rto": dur(self.rto_s), "rto objective": dur(self.rto_objective_s),
            "source": self.source, "scratch": self.scratch,
            "checks": f"{len(self.checks) - len(self.failed_checks)}/{len(self.checks)}",
            "kept": self.kept, "detail": self.summary(),
            "notes": redact("; ".join(self.notes)),
        }


def objective_checks(result: DrillResult) -> None:
    if result.rto_s is not None:
        result.check("rto", not result.rto_breached,
                     f"{dur(result.rto_s)} (objective {dur(result.rto_objective_s)})")
    if result.rpo_s is not None:
        result.check("rpo", not result.rpo_breached,
                     f"{dur(result.rpo_s)} (objective {dur(result.rpo_objective_s)})")


def dur(seconds: float | None) -> str:
    """A duration for people: seconds, minutes or hours; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class DrillFailed(LabkeeperError):
    """A drill failed for a reason worth retrying (raised by the task wrappers so
    Prefect retries it); carries the result."""

    def __init__(self, result: DrillResult) -> None:
        super().__init__(f"{result.label}: {result.summary()}", transient=result.transient)
        self.result = result
