"""What PVE answers, read into tolerant pydantic models (``extra="ignore"``), and
task ids (:class:`Upid`), parsed from PVE's ``UPID:node:pid:...`` strings."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from labkeeper.errors import ServiceError
from labkeeper.proxmox.request import GuestType


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _split_tags(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [t for t in re.split(r"[;,\s]+", value) if t]
    return value


Tags = Annotated[list[str], BeforeValidator(_split_tags)]


class Guest(_Tolerant):
    """A guest as ``/cluster/resources`` lists it."""

    vmid: int
    type: GuestType
    node: str
    name: str = ""
    status: str = "unknown"
    tags: Tags = []
    pool: str | None = None
    template: bool = False
    lock: str | None = None
    maxmem: int = 0
    maxdisk: int = 0
    uptime: int = 0


class GuestStatus(_Tolerant):
    status: str
    vmid: int | None = None
    name: str = ""
    lock: str | None = None
    uptime: int = 0
    qmpstatus: str | None = None
    tags: Tags = []


class GuestConfig(_Tolerant):
    """A guest's configuration; ``values`` holds every key as PVE returned it."""

    digest: str = ""
    lock: str | None = None
    parent: str | None = None
    hostname: str | None = None
    name: str | None = None
    template: bool = False
    tags: Tags = []
    values: dict[str, Any] = {}

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> GuestConfig:
        return cls.model_validate({**data, "values": dict(data)})


class Snapshot(_Tolerant):
    name: str
    snaptime: int | None = None
    description: str = ""
    parent: str | None = None
    vmstate: bool = False


class StorageVolume(_Tolerant):
    volid: str
    content: str
    format: str = ""
    size: int = 0
    ctime: int | None = None
    vmid: int | None = None
    notes: str = ""
    protected: bool = False
    subtype: str | None = None
    parent: str | None = None


class PruneMark(_Tolerant):
    volid: str
    mark: Literal["keep", "remove", "protected", "renamed"]
    ctime: int | None = None
    type: str | None = None
    vmid: int | None = None


class BackupJob(_Tolerant):
    id: str
    type: str = "vzdump"
    schedule: str | None = None
    enabled: bool = True
    storage: str | None = None
    vmid: str | None = None
    all: bool = False
    pool: str | None = None
    node: str | None = None
    mode: str | None = None
    compress: str | None = None
    comment: str | None = None
    notes_template: str | None = Field(default=None, alias="notes-template")
    prune_backups: str | dict[str, Any] | None = Field(default=None, alias="prune-backups")
    next_run: int | None = Field(default=None, alias="next-run")

    @property
    def vmids(self) -> list[int]:
        return [int(v) for v in re.split(r"[,;\s]+", self.vmid or "") if v]


class TaskSummary(_Tolerant):
    """A task as ``GET /nodes/{node}/tasks`` lists it (``status`` = exit status)."""

    upid: str
    node: str
    type: str
    id: str = ""
    user: str = ""
    starttime: int = 0
    endtime: int | None = None
    status: str | None = None


class TaskStatus(_Tolerant):
    status: Literal["running", "stopped"]
    exitstatus: str | None = None
    starttime: int | None = None
    type: str | None = None
    id: str | None = None


class VersionInfo(_Tolerant):
    version: str
    release: str = ""
    repoid: str = ""


# --- UPIDs: PVE's task ids


@dataclass(frozen=True)
class Upid:
    """PVE's task id ``UPID:node:pid:pstart:starttime:type:id:user:`` (hex numbers)."""

    raw: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str

    def __str__(self) -> str:
        return self.raw


def parse_upid(text: str) -> Upid:
    """Parse a UPID; the id may itself contain ``:`` (the user never does)."""
    text = str(text).strip()
    parts = text.split(":")
    if len(parts) < 9 or parts[0] != "UPID" or parts[-1] != "":
        raise ValueError(f"not a PVE UPID: {text!r}")
    node, pid, pstart, starttime, ttype = parts[1:6]
    user = parts[-2]
    task_id = ":".join(parts[6:-2])
    if not node or not ttype or "@" not in user:
        raise ValueError(f"not a PVE UPID: {text!r}")
    try:
        return Upid(text, node, int(pid, 16), int(pstart, 16), int(starttime, 16), ttype,
                    task_id, user)
    except ValueError:
        raise ValueError(f"not a PVE UPID: {text!r}") from None


def as_upid(data: Any, what: str) -> Upid:
    try:
        return parse_upid(str(data))
    except ValueError:
        raise ServiceError(f"proxmox {what}: expected a task id (UPID), got {data!r}",
                           service="proxmox", transient=False) from None
