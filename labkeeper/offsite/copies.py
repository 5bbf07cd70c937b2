"""What a good off-site copy is, and which copies retention keeps (pure; shared by the
S3 and the SSH host targets). A copy is *good* only when its recorded size and SHA-256
are complete and agree with it (:func:`is_verified`); retention counts only good copies
and removes the rest."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from labkeeper.errors import PermanentError

META_SIZE = "size"
META_SHA256 = "sha256"
META_VOLID = "volid"
META_VMID = "vmid"
META_CTIME = "ctime"


class OffsiteMismatch(PermanentError):
    """What was uploaded is not what the node holds (changed while read, or corrupt)."""


@dataclass(frozen=True)
class RemoteObject:
    key: str
    size: int
    last_modified: float
    metadata: dict[str, str]
    etag: str = ""

    @property
    def archive_time(self) -> float:
        """When the archive was made (its ``ctime`` metadata, else the upload time)."""
        try:
            return float(self.metadata.get(META_CTIME, ""))
        except ValueError:
            return self.last_modified


def is_verified(obj: RemoteObject) -> bool:
    """Our metadata is there and agrees with the object's length."""
    sha = obj.metadata.get(META_SHA256, "")
    return (re.fullmatch(r"[0-9a-f]{64}", sha) is not None
            and obj.metadata.get(META_SIZE) == str(obj.size))


def retention_plan(objects: Iterable[RemoteObject], keep_last: int,
                   max_age_days: int | None, now: float) -> tuple[list[str], list[str]]:
    """(keep, delete) keys of one guest's copies.

    The newest ``keep_last`` *verified* copies are always kept; older verified
    copies are kept while younger than ``max_age_days`` (if set); unverified
    objects (no or wrong metadata) never count and are deleted.
    """
    good = sorted((o for o in objects if is_verified(o)), key=lambda o: (o.archive_time, o.key),
                  reverse=True)
    bad = [o.key for o in objects if not is_verified(o)]
    keep: list[str] = []
    delete: list[str] = list(bad)
    for i, obj in enumerate(good):
        young = max_age_days is not None and now - obj.archive_time < max_age_days * 86400
        (keep if i < keep_last or young else delete).append(obj.key)
    return keep, sorted(delete)


@dataclass(frozen=True)
class CopyResult:
    key: str
    size: int
    sha256: str
    status: str  # "copied" | "present"
    parts: int = 0
    seconds: float = 0.0
    aborted_stale: int = 0


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
