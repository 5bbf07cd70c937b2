"""What one path set's backup reports: its naming (series and attempt tags), its
result row, its errors (every one picklable: they cross process boundaries).
"""

from __future__ import annotations

import secrets as pysecrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from labkeeper.errors import LabkeeperError, PermanentError, TransientError
from labkeeper.path_backup.progress import shorten_path
from labkeeper.secrets import redact

# -- naming (pure) -------------------------------------------------------------------------

def series_label(host: str, name: str) -> str:
    return f"paths:{host}/{name}"


def series_tags(host: str, name: str) -> list[str]:
    """The stable tags of one path set's series."""
    return ["labkeeper", series_label(host, name), "kind:paths"]


def new_backup_id(now: datetime | None = None) -> str:
    """A unique id per attempt: ``20260101T020000Z-1a2b3c`` (same form as pg_backup)."""
    now = now or datetime.now(tz=UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{pysecrets.token_hex(3)}"


def backup_tag(backup_id: str) -> str:
    return f"backup:{backup_id}"


# -- results and errors ----------------------------------------------------------------------

@dataclass
class PathBackupResult:
    name: str
    host: str
    backup_id: str
    status: str  # ok | warning
    snapshot_id: str
    restic_version: str
    files: int
    bytes_processed: int
    data_added: int
    files_new: int
    files_changed: int
    files_unmodified: int
    duration_s: float
    restic_s: float
    unreadable_count: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def series(self) -> str:
        return series_label(self.host, self.name)

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_processed / 1e6 / self.restic_s if self.restic_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "path set": f"{self.host}/{self.name}", "status": self.status,
            "snapshot": self.snapshot_id[:8], "files": self.files,
            "bytes": self.bytes_processed, "bytes added (uncompressed)": self.data_added,
            "new/changed/unmodified": f"{self.files_new}/{self.files_changed}/"
                                      f"{self.files_unmodified}",
            "duration s": round(self.duration_s, 2), "restic s": round(self.restic_s, 2),
            "throughput MB/s": round(self.throughput_mb_s, 1),
            "unreadable": self.unreadable_count, "restic": self.restic_version,
            "backup id": self.backup_id,
            "notes": redact("; ".join(self.notes)),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResticMissing(PermanentError):
    """restic is not installed (or too old) on the backup host."""

    def __init__(self, message: str, *, host: str = "") -> None:
        super().__init__(message)
        self.host = host


class PathBackupFailed(LabkeeperError):
    """One path set's backup failed; nothing of this attempt is left counted as good."""

    def __init__(self, message: str, *, transient: bool = False, path_set: str = "",
                 backup_id: str = "") -> None:
        super().__init__(redact(message), transient=transient)
        self.path_set = path_set
        self.backup_id = backup_id


class AttemptStillRunning(TransientError):
    """A process of a failed attempt still runs on the host after SIGKILL."""


def iter_unreadable_lines(result: PathBackupResult, width: int = 160) -> Iterator[str]:
    for u in result.unreadable:
        yield f"{shorten_path(u['path'], width)} — {u['reason']} ({u['during']})"
    if result.unreadable_count > len(result.unreadable):
        yield f"… and {result.unreadable_count - len(result.unreadable)} more"

