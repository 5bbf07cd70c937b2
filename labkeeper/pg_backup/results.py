"""What a PostgreSQL backup reports: the result rows of a database and of a server's
globals, and the error of a failed database backup (picklable)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from labkeeper.errors import LabkeeperError
from labkeeper.secrets import redact


@dataclass
class BackupResult:
    database: str
    server: str
    backup_id: str
    snapshot_id: str
    manifest_snapshot_id: str
    bytes_dumped: int
    data_added: int
    duration_s: float
    table_count: int
    total_rows: int
    notes: list[str] = field(default_factory=list)
    stream_s: float = 0.0
    """Seconds of the pg_dump → restic stream alone (the rest: locks, manifest, proof)."""
    pending_left: int = 0
    """Earlier failed attempts whose cleanup is still pending after this run's sweep."""

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_dumped / 1e6 / self.duration_s if self.duration_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "database": self.database, "status": "warning" if self.pending_left else "ok",
            "snapshot": self.snapshot_id[:8],
            "bytes dumped": self.bytes_dumped,
            "bytes added (uncompressed)": self.data_added,
            "duration s": round(self.duration_s, 2), "stream s": round(self.stream_s, 2),
            "throughput MB/s": round(self.throughput_mb_s, 1),
            "tables": self.table_count, "backup id": self.backup_id,
            "notes": redact("; ".join(self.notes)),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BackupFailed(LabkeeperError):
    """One database's backup failed; nothing of this attempt is left counted as good."""

    def __init__(self, message: str, *, transient: bool = False, database: str = "",
                 backup_id: str = "") -> None:
        super().__init__(redact(message), transient=transient)
        self.database = database
        self.backup_id = backup_id



@dataclass
class GlobalsResult:
    server: str
    status: str  # ok | warning
    detail: str
    snapshot_id: str = ""
    bytes_dumped: int = 0
    role_passwords: bool = False

    def row(self) -> dict[str, Any]:
        return {"database": f"globals {self.server}", "status": self.status,
                "snapshot": self.snapshot_id[:8], "bytes dumped": self.bytes_dumped,
                "bytes added (uncompressed)": 0, "duration s": 0, "throughput MB/s": 0,
                "tables": 0, "backup id": "", "notes": redact(self.detail)}

