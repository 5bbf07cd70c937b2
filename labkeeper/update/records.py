"""The records of an application update: errors, protections, journals, pins, results.

Plain dataclasses (no I/O): what the other ``labkeeper.update`` modules pass around
and what the journal and pin files hold.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from labkeeper import health
from labkeeper.errors import PermanentError, TransientError
from labkeeper.proxmox import GuestType
from labkeeper.secrets import redact

PREFIX = "labkeeper-pre-update-"
Mode = Literal["snapshot", "vzdump", "compose-images", "none"]


class UpdateFailed(PermanentError):
    """An update command exited non-zero (the app is then rolled back)."""


class GateFailed(PermanentError):
    """Health did not come after the update (the app is then rolled back)."""


class RollbackFailed(PermanentError):
    """Rolling back did not work: the app needs a person."""


class PullFailed(TransientError):
    """``docker compose pull`` failed (registry down, unknown tag): nothing changed."""


class GuestBusy(TransientError):
    """Another update holds the guest's lock."""

@dataclass
class Protection:
    kind: Mode
    node: str
    vmid: int
    gtype: GuestType
    snapshot: str | None = None
    volid: str | None = None
    images: dict[str, str] = field(default_factory=dict)
    """compose: service → image ID before the update (every rollback mode re-tags these
    onto ``refs`` afterwards, so that a later ``up -d`` keeps them)."""
    refs: dict[str, str] = field(default_factory=dict)
    """compose: service → the image reference its compose file names."""
    digests: dict[str, str] = field(default_factory=dict)
    """compose: service → registry digest of the image before the update ("" unknown):
    a rollback pulls ``repo@digest`` when the image is no longer on the guest."""
    databases: list[str] = field(default_factory=list)
    """Databases backed up before the update (backup ids)."""

    def text(self) -> str:
        if self.kind == "snapshot":
            return f"snapshot {self.snapshot}"
        if self.kind == "vzdump":
            return f"vzdump {self.volid}"
        if self.kind == "compose-images":
            shown = ", ".join(f"{svc}={short_digest(self.digests.get(svc) or iid)}"
                              for svc, iid in sorted(self.images.items()))
            return f"compose images {shown}"
        return "none"

    def names(self) -> set[str]:
        """The snapshot / archive this protection depends on (what cleanup spares)."""
        return {n for n in (self.snapshot, self.volid) if n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protection:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Journal:
    """What an unfinished update left behind (``<state_dir>/updates/<app>.json``)."""

    app: str
    run_id: str
    phase: Literal["protecting", "protected", "updated", "rolling-back", "rolled-back",
                   "rollback-failed"]
    protection: Protection
    before: dict[str, str] = field(default_factory=dict)
    attempted: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    detail: str = ""
    touched: float = 0.0
    """When the journal was last written (each phase change): its age decides whether
    crash recovery may act on its own (:func:`is_stale`)."""
    offered: dict[str, str] = field(default_factory=dict)
    """compose: service → the digest the update deploys (remembered as bad on rollback)."""
    guest: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Journal:
        data = json.loads(text)
        data["protection"] = Protection.from_dict(data["protection"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Pin:
    """A Compose app rolled back to ``images``; ``bad`` are the digests that failed.

    While pinned, an update that finds the registry offering only bad digests holds
    the app (loudly) instead of deploying them again; a good update removes the pin."""

    app: str
    run_id: str
    since: float
    images: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    bad: dict[str, list[str]] = field(default_factory=dict)
    """service → digests rolled back from (newest last)."""
    reason: str = ""

    def bad_digests(self) -> set[str]:
        return {d for ds in self.bad.values() for d in ds}

    def text(self) -> str:
        good = ", ".join(f"{svc}={short_digest(self.digests.get(svc) or iid)}"
                         for svc, iid in sorted(self.images.items()))
        bad = ", ".join(sorted(short_digest(d) for d in self.bad_digests())) or "-"
        return f"pinned to {good} since run {self.run_id}; not deploying {bad}"

def short_digest(digest: str) -> str:
    algo, sep, hexa = digest.partition(":")
    return f"{algo}:{hexa[:12]}" if sep else digest[:12]

@dataclass
class Preflight:
    healthy: bool
    in_window: bool
    probes: list[health.ProbeResult]
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "in_window": self.in_window, "reason": self.reason,
                "probes": [p.row() for p in self.probes]}

@dataclass
class Versions:
    values: dict[str, str] = field(default_factory=dict)
    image_ids: dict[str, str] = field(default_factory=dict)
    """compose: service → image ID (what a rollback brings back)."""
    planned: dict[str, str] = field(default_factory=dict)
    """apt: package → version the upgrade will install."""
    refs: dict[str, str] = field(default_factory=dict)
    """compose: service → the image reference the compose file names."""
    digests: dict[str, str] = field(default_factory=dict)
    """compose: service → registry digest of the image it runs ("" when unknown)."""

@dataclass
class Offer:
    """What ``docker compose pull`` brought, per service, next to what runs."""

    ids: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    """Services whose reference now names another image than the one running."""
    held: dict[str, str] = field(default_factory=dict)
    """Changed services whose new digest was rolled back before (pinned apps)."""
    values: dict[str, str] = field(default_factory=dict)

    @property
    def new(self) -> bool:
        return bool(self.changed)

# --- results ------------------------------------------------------------------------------

Status = Literal["updated", "current", "rolled-back", "failed", "skipped", "dry-run",
                 "recovered", "blocked", "held", "stale"]
"""``current``: the registry offers what runs (nothing to do); ``blocked``: another
update of the guest holds its lock; ``held``: the registry offers only digests that
were rolled back before; ``stale``: an old unfinished update waits for a person."""
NOT_DONE: frozenset[str] = frozenset({"blocked", "held", "stale"})
"""Not updated, and not fine: never a green run (the run fails, the CLI exits 3)."""


@dataclass
class AppResult:
    app: str
    status: Status
    detail: str = ""
    protection: str = ""
    before: dict[str, str] = field(default_factory=dict)
    attempted: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str = ""
    plan: list[str] = field(default_factory=list)
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    """compose: ``before`` / ``offered`` / ``after`` → service → registry digest."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (fetch, protect, update, gate, ...)."""

    def row(self) -> dict[str, Any]:
        return {"app": self.app, "status": self.status, "protection": self.protection,
                "before": fmt_versions(self.before), "attempted": fmt_versions(self.attempted),
                "after": fmt_versions(self.after), "removed": ", ".join(self.removed),
                "seconds": round(self.seconds, 2), "detail": redact(self.detail)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt_versions(values: Mapping[str, str]) -> str:
    if not values:
        return "-"
    if list(values) == ["version"]:
        return values["version"]
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items()))


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    start = time.monotonic()
    yield lambda: time.monotonic() - start
