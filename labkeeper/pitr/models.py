"""Pure pieces of point-in-time recovery: LSNs, WAL segment names, tags, records.

WAL segment names are ``TTTTTTTTXXXXXXXXYYYYYYYY`` (timeline, then the segment
number split in "log" and "seg" halves, 16 MiB segments by default: 256 per log).
Snapshot tags: ``labkeeper``, ``pg:<server>``, ``kind:basebackup`` |
``kind:basebackup_info`` | ``kind:wal``, ``backup:<id>``; a WAL snapshot also carries
``wal:<first>-<last>`` (the segment range in its tar).
"""

from __future__ import annotations

import builtins
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict

SEGMENT_SIZE = 16 * 1024 * 1024
SEGMENT_RE = re.compile(r"^[0-9A-F]{24}$")
HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
INFO_FORMAT = 1


# -- LSNs and segments -------------------------------------------------------------------

def parse_lsn(text: str) -> int:
    """``'0/3000028'`` -> 50331688."""
    m = _LSN_RE.match(text.strip())
    if not m:
        raise ValueError(f"not a WAL location (LSN): {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segments_per_log(seg_size: int = SEGMENT_SIZE) -> int:
    return 0x100000000 // seg_size


def segment_number(lsn: int, seg_size: int = SEGMENT_SIZE) -> int:
    return lsn // seg_size


def segment_name(timeline: int, segno: int, seg_size: int = SEGMENT_SIZE) -> str:
    per = segments_per_log(seg_size)
    return f"{timeline:08X}{segno // per:08X}{segno % per:08X}"


def parse_segment(name: str, seg_size: int = SEGMENT_SIZE) -> tuple[int, int]:
    """``(timeline, segment number)`` of a segment file name."""
    if not SEGMENT_RE.match(name):
        raise ValueError(f"not a WAL segment name: {name!r}")
    per = segments_per_log(seg_size)
    return int(name[:8], 16), int(name[8:16], 16) * per + int(name[16:], 16)


def segment_of_lsn(timeline: int, lsn: int, seg_size: int = SEGMENT_SIZE) -> str:
    return segment_name(timeline, segment_number(lsn, seg_size), seg_size)


def is_wal_file(name: str) -> bool:
    """A completed segment or a timeline history file (never ``.partial``)."""
    return bool(SEGMENT_RE.match(name) or HISTORY_RE.match(name))


def first_gap(names: list[str], start: str, seg_size: int = SEGMENT_SIZE) -> str | None:
    """The first segment missing from ``names`` after ``start`` (inclusive) up to the
    newest one present, following timelines upwards (a newer timeline continues the
    chain at the same or the next segment number). None when the chain is complete."""
    have = {parse_segment(n, seg_size) for n in names if SEGMENT_RE.match(n)}
    tli, segno = parse_segment(start, seg_size)
    if (tli, segno) not in have:
        return start
    newest = max(s for _t, s in have)
    while segno < newest:
        segno += 1
        later = sorted(t for t, s in have if s == segno and t >= tli)
        if not later:
            return segment_name(tli, segno, seg_size)
        tli = later[0]
    return None


# -- tags --------------------------------------------------------------------------------

def server_tag(server: str) -> str:
    return f"pg:{server}"


def base_tags(server: str) -> list[str]:
    return ["labkeeper", server_tag(server), "kind:basebackup"]


def base_info_tags(server: str) -> list[str]:
    return ["labkeeper", server_tag(server), "kind:basebackup_info"]


def wal_tags(server: str, first: str, last: str, *, covered_until: float | None = None
             ) -> list[str]:
    """``walto:<unix s>``: every commit before that moment is in this batch or an earlier
    one (set when the ship closed the server's segment first)."""
    tags = ["labkeeper", server_tag(server), "kind:wal", f"wal:{first}-{last}"]
    return tags + ([f"walto:{int(covered_until)}"] if covered_until is not None else [])


def walmark_tags(server: str, covered_until: float) -> list[str]:
    """A ship that found nothing new still proves the archive reaches this moment."""
    return ["labkeeper", server_tag(server), "kind:walmark", f"walto:{int(covered_until)}"]


def covered_until_of(tags: list[str]) -> datetime | None:
    for t in tags:
        if t.startswith("walto:") and t[6:].isdigit():
            return datetime.fromtimestamp(int(t[6:]), tz=UTC)
    return None


def wal_range_of(tags: list[str]) -> tuple[str, str] | None:
    for t in tags:
        if t.startswith("wal:") and "-" in t:
            first, last = t[4:].split("-", 1)
            if SEGMENT_RE.match(first) and SEGMENT_RE.match(last):
                return first, last
    return None


def base_filename(server: str) -> str:
    return f"{server}.base.tar"


def info_filename(server: str) -> str:
    return f"{server}.basebackup.json"


def wal_filename(first: str, last: str) -> str:
    return f"wal-{first}-{last}.tar"


# -- records -----------------------------------------------------------------------------

class BaseBackupInfo(BaseModel):
    """What a base backup covers, stored beside it (``<server>.basebackup.json``) with
    the same ``backup:`` tag; a base backup counts only once this is stored."""

    model_config = ConfigDict(extra="ignore")

    format: int = INFO_FORMAT
    backup_id: str
    server: str
    lab: str
    timeline: int
    start_lsn: str
    end_lsn: str
    started_at: datetime
    finished_at: datetime
    """Our clock after pg_basebackup exited: every target at or after it is past the
    backup's consistency point."""
    bytes: int
    snapshot_id: str
    server_version: str = ""

    @property
    def start_segment(self) -> str:
        return segment_of_lsn(self.timeline, parse_lsn(self.start_lsn))

    @property
    def end_segment(self) -> str:
        return segment_of_lsn(self.timeline, parse_lsn(self.end_lsn))

    def to_json(self) -> builtins.bytes:  # the field ``bytes`` shadows the builtin here
        return (json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)
                + "\n").encode()


@dataclass(frozen=True)
class WalRange:
    """Timeline and LSNs of a base backup, read from its ``backup_manifest``."""

    timeline: int
    start_lsn: str
    end_lsn: str


_WAL_RANGE_RE = re.compile(
    r'"Timeline":\s*(\d+),\s*"Start-LSN":\s*"([0-9A-F]+/[0-9A-F]+)",\s*'
    r'"End-LSN":\s*"([0-9A-F]+/[0-9A-F]+)"')
_CHECKSUM_END_RE = re.compile(rb'"Manifest-Checksum":\s*"[0-9a-f]{64}"\}\s*$')


def parse_wal_ranges(text: str) -> list[WalRange]:
    return [WalRange(int(t), s, e) for t, s, e in _WAL_RANGE_RE.findall(text)]


def basebackup_tail_problem(tail: bytes, nbytes: int) -> str | None:
    """Why a ``pg_basebackup -Ft -D -`` stream is not complete (None when it is): it
    must be whole 512-byte tar blocks, end with tar's end-of-archive zero blocks, and
    its last member must be the ``backup_manifest`` pg_basebackup adds at the very end
    (its checksum line closes it)."""
    if nbytes == 0:
        return "pg_basebackup wrote nothing"
    if nbytes % 512:
        return f"the tar stream is {nbytes} bytes, not whole 512-byte blocks"
    body = tail.rstrip(b"\0")
    if len(tail) - len(body) < 1024:
        return "the tar stream lacks its end-of-archive blocks"
    if not _CHECKSUM_END_RE.search(body[-200:]):
        return "the backup_manifest (written last) is missing or cut short"
    if not parse_wal_ranges(body.decode("utf-8", "replace")):
        return "the backup_manifest names no WAL range"
    return None


def tar_tail_problem(tail: bytes, nbytes: int) -> str | None:
    """Why a tar stream is not complete: whole blocks ending with end-of-archive."""
    if nbytes == 0 or nbytes % 512:
        return f"the tar stream is {nbytes} bytes, not whole 512-byte blocks"
    if len(tail) - len(tail.rstrip(b"\0")) < 1024:
        return "the tar stream lacks its end-of-archive blocks"
    return None
