"""Tolerant pydantic models of restic's JSON output (restic 0.14 through 0.18) and
their pure parsers: snapshots, versions, backup summaries and messages, ``ls``
nodes, locks, ``forget`` groups.

**Snapshot ids.** 0.14's ``backup --json`` summary names the snapshot by its short
id, 0.18's by its full id; :func:`labkeeper.restic.canonical_summary` makes every
summary carry the full id. Compare ids with :func:`same_id`, show them with
:func:`short_id`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class Snapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    short_id: str = ""
    time: datetime
    hostname: str = ""
    paths: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    parent: str | None = None
    tree: str | None = None


class RepoConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int
    id: str


def parse_snapshots(stdout: str) -> list[Snapshot]:
    data = json.loads(stdout or "[]")
    if data is None:
        return []
    return [Snapshot.model_validate(s) for s in data]


_VERSION_RE = re.compile(r"^restic (\d+\.\d+\.\d+)")


def parse_version(stdout: str) -> str:
    m = _VERSION_RE.match(stdout.strip())
    if not m:
        raise ValueError(f"unexpected `restic version` output: {stdout[:80]!r}")
    return m.group(1)


@dataclass(frozen=True, order=True)
class ResticVersion:
    """A restic version and what it offers."""

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, stdout: str) -> ResticVersion:
        a, b, c = (int(x) for x in parse_version(stdout).split("."))
        return cls(a, b, c)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def retry_lock(self) -> bool:
        """``--retry-lock`` (0.16.0)."""
        return (self.major, self.minor) >= (0, 16)

    @property
    def exit_codes(self) -> bool:
        """Exit codes 10 (no repository), 11 (lock failed), 12 (wrong password) and
        JSON ``exit_error`` messages (0.17.0); older versions exit 1 for all three."""
        return (self.major, self.minor) >= (0, 17)

    @property
    def stdin_from_command(self) -> bool:
        """``backup --stdin-from-command`` (0.17.0; deliberately unused, see
        :mod:`labkeeper.restic.streaming`)."""
        return (self.major, self.minor) >= (0, 17)


HEX_ID = re.compile(r"[0-9a-f]{8,64}")


def is_full_id(snapshot_id: str) -> bool:
    return len(snapshot_id) == 64 and bool(HEX_ID.fullmatch(snapshot_id))


def short_id(snapshot_id: str) -> str:
    """The 8-hex form restic shows (for display only; store and compare full ids)."""
    return snapshot_id[:8]


def same_id(a: str, b: str) -> bool:
    """Do two snapshot ids name the same snapshot? Full ids compare equal; a short id
    (restic 0.14's summary, manifests written before ids were canonical) matches the
    full id it is a prefix of. Never true for an empty or non-hex id."""
    if not (HEX_ID.fullmatch(a) and HEX_ID.fullmatch(b)):
        return False
    shorter, longer = sorted((a, b), key=len)
    return longer.startswith(shorter)



class BackupSummary(BaseModel):
    """The final ``--json`` line of ``restic backup``. ``data_added`` is uncompressed
    in restic 0.14 (the bytes really stored are smaller when compression is on)."""

    model_config = ConfigDict(extra="ignore")

    message_type: str
    snapshot_id: str
    """Full (0.17+) or short (0.14) here; :func:`canonical_summary` makes it full."""
    data_added: int = 0
    data_added_packed: int | None = None
    """Bytes really added to the repository, after compression (restic 0.17+ only)."""
    total_bytes_processed: int = 0
    total_duration: float = 0.0
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0

    @property
    def files(self) -> int:
        return self.files_new + self.files_changed + self.files_unmodified


def stdin_summary_problem(summary: BackupSummary, nbytes: int) -> str | None:
    """Why the summary of a ``restic backup --stdin`` does not prove a snapshot of
    exactly one file holding the ``nbytes`` bytes sent; None when it does.

    restic prints the summary only after the snapshot was saved, and for ``--stdin``
    ``total_bytes_processed`` counts the bytes it read: equal to what we sent, the
    stored file is the whole stream (``restic ls`` would report the same)."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", summary.snapshot_id):
        return f"restic reported no usable snapshot id ({summary.snapshot_id!r})"
    if summary.files != 1:
        return f"restic stored {summary.files} files, not the one stdin file"
    if summary.total_bytes_processed != nbytes:
        return (f"restic stored {summary.total_bytes_processed} bytes but {nbytes} were "
                f"sent (snapshot {summary.snapshot_id})")
    return None


def parse_backup_summary(stdout: str) -> BackupSummary:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("message_type") == "summary":
            return BackupSummary.model_validate(data)
    raise ValueError("restic backup printed no summary line (no snapshot was reported)")


class LsNode(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = ""
    type: str = ""
    path: str = ""
    size: int | None = None
    struct_type: str = ""
def parse_ls(stdout: str) -> list[LsNode]:
    nodes = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        data = json.loads(line)
        if data.get("struct_type") == "node":
            nodes.append(LsNode.model_validate(data))
    return nodes


class LockInfo(BaseModel):
    """A lock file's content (``restic cat lock``)."""

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    time: datetime
    exclusive: bool = False
    hostname: str = ""
    username: str = ""
    pid: int = 0


def parse_lock(lock_id: str, stdout: str) -> LockInfo:
    info = LockInfo.model_validate_json(stdout)
    return info.model_copy(update={"id": lock_id})



class ForgetGroup(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tags: list[str] | None = None
    host: str = ""
    paths: list[str] | None = None
    keep: list[Snapshot] | None = None
    remove: list[Snapshot] | None = None


def parse_forget(stdout: str) -> list[ForgetGroup]:
    """``restic forget --json`` prints one JSON array (groups with keep/remove)."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("["):
            data = json.loads(line)
            return [ForgetGroup.model_validate(g) for g in (data or [])]
    return []



# -- restic backup --json messages while it runs (files, not stdin) -------------------

class StatusMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_type: str = "status"
    percent_done: float = 0.0
    total_files: int = 0
    files_done: int = 0
    total_bytes: int = 0
    bytes_done: int = 0
    error_count: int = 0
    seconds_elapsed: int = 0
    seconds_remaining: int | None = None
    current_files: list[str] | None = None


class ErrorMessage(BaseModel):
    """restic 0.14: ``{"error": {"Op","Path","Err": errno}, "during", "item"}``; later
    versions add ``error.message``. The ``error`` object varies: keep it loose."""

    model_config = ConfigDict(extra="ignore")

    message_type: str = "error"
    error: dict[str, Any] | str | None = None
    during: str = ""
    item: str = ""

    @property
    def path(self) -> str:
        if self.item:
            return self.item
        if isinstance(self.error, dict):
            return str(self.error.get("Path") or self.error.get("path") or "")
        return ""

    @property
    def reason(self) -> str:
        e = self.error
        if isinstance(e, str):
            return e
        if not isinstance(e, dict):
            return "unknown error"
        if e.get("message"):
            return str(e["message"])
        op = str(e.get("Op") or "")
        errno = e.get("Err")
        text = os.strerror(errno) if isinstance(errno, int) else str(errno or "error")
        return f"{op}: {text}" if op else text


class SummaryMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_type: str = "summary"
    snapshot_id: str
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    dirs_changed: int = 0
    dirs_unmodified: int = 0
    data_blobs: int = 0
    tree_blobs: int = 0
    data_added: int = 0
    total_files_processed: int = 0
    total_bytes_processed: int = 0
    total_duration: float = 0.0


Message = StatusMessage | ErrorMessage | SummaryMessage


def parse_message(line: str) -> Message | None:
    """One line of ``restic backup --json`` (stdout or stderr); None for anything else
    (plain-text warnings, ``verbose_status``)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("message_type")
    kinds: dict[str, type[BaseModel]] = {"status": StatusMessage, "error": ErrorMessage,
                                         "summary": SummaryMessage}
    model = kinds.get(str(kind))
    if model is None:
        return None
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError:
        return None

