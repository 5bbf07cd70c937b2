"""Is a new vzdump archive a good backup? Names, notes and formats; the task log;
verification; the schedule period (a rerun skips guests already backed up); the
result records of a guest's backup and of its retention.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any, Literal
from zoneinfo import ZoneInfo

from labkeeper import proxmox as px
from labkeeper.secrets import redact

Status = Literal["ok", "warning", "failed", "locked", "skipped"]


# ====================================================================== names, notes, formats


_COMPRESS_EXT = {"zstd": ".zst", "gzip": ".gz", "lzo": ".lzo", "0": ""}
_BASE_FORMAT = {"lxc": "tar", "qemu": "vma"}


def expected_format(gtype: str, compress: str) -> str:
    """The storage content ``format`` of a new archive: ``tar.zst``, ``vma.gz``, ``tar``…"""
    return _BASE_FORMAT[gtype] + _COMPRESS_EXT[compress]


def render_notes(template: str, *, guestname: str, vmid: int, node: str,
                 cluster: str | None = None) -> str:
    """PVE's notes-template rendering (``{{guestname}}``, ``{{vmid}}``, ``{{node}}``,
    ``{{cluster}}``; ``\\n`` becomes a newline). An unknown cluster name stays as is."""
    values = {"guestname": guestname, "vmid": str(vmid), "node": node}
    if cluster is not None:
        values["cluster"] = cluster
    out = template
    for key, value in values.items():
        out = re.sub(r"\{\{\s*" + key + r"\s*\}\}", partial(_literal, value), out)
    return out.replace("\\n", "\n")


def _literal(value: str, _match: re.Match[str]) -> str:
    """A replacement taken as is (no backslash escapes, unlike a template string)."""
    return value


def notes_match(template: str, notes: str, *, guestname: str, vmid: int, node: str) -> bool:
    """Do the archive's notes match the rendered template (``{{cluster}}`` = anything)?"""
    rendered = render_notes(template, guestname=guestname, vmid=vmid, node=node)
    parts = re.split(r"\{\{\s*cluster\s*\}\}", rendered)
    pattern = ".+?".join(re.escape(p) for p in parts)
    return re.fullmatch(pattern, notes or "", flags=re.S) is not None


_ARCHIVE_NAME = re.compile(
    r"^vzdump-(?P<type>lxc|qemu|openvz)-(?P<vmid>\d+)-"
    r"(?P<stamp>\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2})\.(?P<ext>[\w.]+)$")


def archive_filename(volid: str) -> str:
    """``local:backup/vzdump-lxc-101-2025_01_01-01_00_00.tar.zst`` → the file name."""
    return posixpath.basename(volid.partition(":")[2])


def archive_time(filename: str) -> int | None:
    """The start time encoded in an archive name (local time of the node, as epoch)."""
    m = _ARCHIVE_NAME.match(filename)
    if not m:
        return None
    return int(datetime.strptime(m.group("stamp"), "%Y_%m_%d-%H_%M_%S").timestamp())


# ====================================================================== task log


@dataclass(frozen=True)
class VzdumpLog:
    """What a vzdump task log says (PVE/VZDump.pm wording)."""

    archive_path: str | None = None
    archive_size: str | None = None
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    finished_ok: bool = False
    skipped_external: tuple[int, ...] = ()


_CREATING = re.compile(r"creating (?:vzdump |Proxmox Backup Server )?archive '([^']+)'")


def parse_log(lines: Iterable[str]) -> VzdumpLog:
    """Read the archive path, its size, errors and warnings from a vzdump log."""
    path = size = None
    errors: list[str] = []
    warnings: list[str] = []
    finished = False
    external: list[int] = []
    for raw in lines:
        line = raw.rstrip()
        body = line[len("INFO: "):] if line.startswith("INFO: ") else line
        if (m := _CREATING.search(body)) is not None:
            path = m.group(1)
        elif body.startswith("archive file size: "):
            size = body[len("archive file size: "):].strip()
        elif line.startswith("ERROR: "):
            errors.append(line[len("ERROR: "):])
        elif line.startswith("WARN: ") or line.startswith("WARNING: "):
            warnings.append(line.split(": ", 1)[1])
        elif body == "Backup job finished successfully":
            finished = True
        elif body.startswith("skip external VMs: "):
            external = [int(v) for v in re.findall(r"\d+", body)]
    return VzdumpLog(path, size, tuple(errors), tuple(warnings), finished, tuple(external))


# ====================================================================== verification


def pick_new_archive(before: Iterable[str], after: Iterable[px.StorageVolume], vmid: int,
                     log_path: str | None = None) -> px.StorageVolume | None:
    """The archive this backup created: named in the log if possible, else the newest
    volume of ``vmid`` that was not there before."""
    known = set(before)
    fresh = [v for v in after if v.volid not in known and (v.vmid in (None, vmid))]
    if log_path:
        name = posixpath.basename(log_path)
        for v in fresh:
            if archive_filename(v.volid) == name:
                return v
    fresh.sort(key=lambda v: (v.ctime or 0, v.volid), reverse=True)
    return fresh[0] if fresh else None


def verify_archive(new: px.StorageVolume | None, *, vmid: int, gtype: str, compress: str,
                   previous: px.StorageVolume | None, min_size_ratio: float,
                   notes_template: str, guestname: str, node: str,
                   log: VzdumpLog | None = None) -> list[str]:
    """Problems with a new archive (empty: it is good)."""
    if new is None:
        return ["no new archive appeared in the storage content"]
    problems: list[str] = []
    if new.vmid is not None and new.vmid != vmid:
        problems.append(f"archive belongs to vmid {new.vmid}, not {vmid}")
    name = archive_filename(new.volid)
    m = _ARCHIVE_NAME.match(name)
    if m is None or int(m.group("vmid")) != vmid or m.group("type") != gtype:
        problems.append(f"archive name {name!r} is not a {gtype} backup of {vmid}")
    if new.size <= 0:
        problems.append("archive size is 0")
    elif previous is not None and previous.size > 0 and min_size_ratio > 0 \
            and new.size < previous.size * min_size_ratio:
        problems.append(f"archive is {new.size} bytes, less than {min_size_ratio:g} x the "
                        f"previous one ({previous.size} bytes)")
    want = expected_format(gtype, compress)
    if new.format and new.format != want:
        problems.append(f"format {new.format!r}, expected {want!r}")
    if notes_template and not notes_match(notes_template, new.notes, guestname=guestname,
                                          vmid=vmid, node=node):
        problems.append(f"notes {new.notes!r} do not match the template {notes_template!r}")
    if log is not None and log.archive_path and posixpath.basename(log.archive_path) != name:
        problems.append(f"the log wrote {posixpath.basename(log.archive_path)!r}, "
                        f"the storage lists {name!r}")
    return problems


# ====================================================================== schedule period


def period_start(cron: str, tz: str, now: datetime | None = None) -> datetime:
    """The last time ``cron`` fired at or before ``now`` (in the time zone ``tz``)."""
    from cronsim import CronSim

    zone = ZoneInfo(tz)
    now = (now or datetime.now(zone)).astimezone(zone)
    return next(CronSim(cron, now.replace(microsecond=0) + timedelta(seconds=1), reverse=True))


def backed_up_since(backups: Iterable[px.StorageVolume], vmid: int,
                    since: float) -> px.StorageVolume | None:
    """The newest archive of ``vmid`` created at or after ``since`` (epoch), if any."""
    found = [b for b in backups if b.vmid == vmid and (b.ctime or 0) >= since and b.size > 0]
    found.sort(key=lambda b: (b.ctime or 0, b.volid), reverse=True)
    return found[0] if found else None


# ====================================================================== results


@dataclass(frozen=True)
class GuestBackup:
    """The outcome of one guest's vzdump (a row of the run's table)."""

    vmid: int
    node: str
    type: str
    name: str
    status: Status
    volid: str = ""
    size: int = 0
    duration: float = 0.0
    upid: str = ""
    warnings: int = 0
    detail: str = ""
    archive_path: str = ""
    log_tail: tuple[str, ...] = ()
    attempts: int = 1
    ctime: int = 0

    @property
    def good(self) -> bool:
        return self.status in ("ok", "warning", "skipped") and bool(self.volid)


@dataclass(frozen=True)
class RetentionResult:
    vmid: int
    retention: str
    dry_run: bool
    remove: tuple[str, ...] = ()
    kept: int = 0
    protected: int = 0
    removed: tuple[str, ...] = ()


@dataclass
class Row:
    """The artifact row of one guest (mutable while the run fills it in)."""

    guest: str
    vmid: int
    node: str
    archive: str = ""
    size: int = 0
    duration_s: float = 0.0
    status: str = "pending"
    pruned: int | str = ""
    offsite: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"guest": self.guest, "vmid": self.vmid, "node": self.node,
                "archive": self.archive, "size": self.size,
                "duration s": round(self.duration_s, 1), "status": self.status,
                "pruned": self.pruned, "offsite": self.offsite,
                "detail": redact(self.detail)[:500]}
