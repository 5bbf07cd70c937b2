"""Progress lines and unreadable paths of a running ``restic backup --json`` (pure):
restic's status messages throttled into a readable line, its error messages into a
deduplicated, capped, exactly counted list.

restic may print its error messages on stderr and the rest on stdout;
:func:`labkeeper.restic.parse_message` reads both (which version does what, and
which unreadable paths restic reports at all: ``benchmarks/README.md``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from labkeeper.restic import ErrorMessage, StatusMessage

UNREADABLE_KEEP = 500
"""At most this many unreadable paths are kept (the count is always exact)."""

@dataclass(frozen=True)
class Unreadable:
    path: str
    reason: str
    during: str

    def short(self, width: int = 120) -> str:
        return f"{shorten_path(self.path, width)} ({self.reason})"


def shorten_path(path: str, width: int = 120) -> str:
    if len(path) <= width:
        return path
    keep = (width - 5) // 2
    return f"{path[:keep]}/…/{path[-keep:]}"


class ErrorCollector:
    """Unreadable paths from restic's error messages: deduplicated (restic reports a
    path once while scanning and once while archiving), capped, exactly counted."""

    def __init__(self, keep: int = UNREADABLE_KEEP) -> None:
        self.keep = keep
        self.items: dict[str, Unreadable] = {}
        self.count = 0
        self.other: list[str] = []

    def add(self, msg: ErrorMessage) -> None:
        path = msg.path
        if path in self.items:
            return
        self.count += 1
        if len(self.items) < self.keep:
            self.items[path] = Unreadable(path=path, reason=msg.reason, during=msg.during)

    def paths(self) -> list[Unreadable]:
        return list(self.items.values())


# -- progress (pure) -----------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_progress(label: str, st: StatusMessage) -> str:
    """``photos@nas: 42.1% · 1.2 GiB of 2.9 GiB · 1234 of 5000 files · 48.0 MiB/s · ETA 1m23s``"""
    parts = [f"{label}: {st.percent_done * 100:.1f}%"]
    parts.append(f"{human_bytes(st.bytes_done)} of {human_bytes(st.total_bytes)}"
                 if st.total_bytes else f"{human_bytes(st.bytes_done)} (scanning)")
    parts.append(f"{st.files_done} of {st.total_files} files")
    if st.seconds_elapsed > 0 and st.bytes_done:
        parts.append(f"{human_bytes(st.bytes_done / st.seconds_elapsed)}/s")
    if st.seconds_remaining is not None and st.percent_done < 1:
        parts.append(f"ETA {human_duration(st.seconds_remaining)}")
    if st.error_count:
        parts.append(f"{st.error_count} unreadable")
    return " · ".join(parts)


class ProgressThrottle:
    """Lets one progress line through every ``interval`` seconds (the first at once)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: float | None = None
        self.latest: StatusMessage | None = None
        self.emitted = 0

    def offer(self, st: StatusMessage) -> bool:
        self.latest = st
        now = self.clock()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            self.emitted += 1
            return True
        return False

