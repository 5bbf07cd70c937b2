"""Progress of long byte streams (dumps, restores, off-site copies) a person can watch.

A :class:`Progress` is fed byte counts from the loops that already move the bytes
(:class:`labkeeper.process.Stage` ``on_bytes`` on a pipeline's producer, the off-site
copy loops). It logs a line (logger ``labkeeper.progress``, INFO) every ``interval``
seconds, or when the stream crosses another 10 % of a known total (never more often
than ``interval / 6``): bytes, rate and, with a total, percent and ETA. A total may be
an estimate (``pg_database_size`` for a dump): the line then says ``~`` and the ETA
stops once the stream outgrows it. When stderr is a terminal a ``rich`` bar shows the
same live; several streams share one bar display. Feeding never raises: a broken log
handler or terminal must not break a backup.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress import Progress as RichProgress

Clock = Callable[[], float]

DEFAULT_INTERVAL = 30.0
STEP = 0.10  # a line at every 10 % of a known total
_BAR_REFRESH = 0.1  # seconds between updates handed to the rich bar

logger = logging.getLogger(__name__)


# -- formatting (pure) -------------------------------------------------------------------

def human_bytes(n: float) -> str:
    """``532 B``, ``1.5 KiB`` … ``2.0 TiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_duration(seconds: float) -> str:
    """``7s``, ``3m05s``, ``2h01m40s``."""
    seconds = int(max(0.0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def rate(done: int, elapsed: float) -> float | None:
    """Average bytes per second since the start; None before any time passed."""
    return done / elapsed if elapsed > 0 else None


def eta(done: int, total: int | None, elapsed: float) -> float | None:
    """Seconds left at the average rate; None without a total, before any byte, or once
    the stream has reached (or outgrown) its total."""
    r = rate(done, elapsed)
    if total is None or not r or done >= total:
        return None
    return (total - done) / r


@dataclass(frozen=True)
class Snapshot:
    """Where a stream stands."""

    label: str
    done: int
    elapsed: float
    total: int | None = None
    estimate: bool = False


def format_line(s: Snapshot, *, finished: bool = False) -> str:
    """``db1 dump: 1.2 GiB of ~3.4 GiB (35%) · 48.0 MiB/s · ETA 45s``; when finished,
    ``db1 dump: done, 3.5 GiB in 1m12s · 48.0 MiB/s``."""
    r = rate(s.done, s.elapsed)
    speed = f"{human_bytes(r)}/s" if r is not None else None
    if finished:
        parts = [f"{s.label}: done, {human_bytes(s.done)} in {human_duration(s.elapsed)}"]
        return " · ".join([*parts, *([speed] if speed else [])])
    head = f"{s.label}: {human_bytes(s.done)}"
    if s.total is not None:
        tilde = "~" if s.estimate else ""
        if s.done <= s.total:
            head += f" of {tilde}{human_bytes(s.total)} ({100 * s.done / max(s.total, 1):.0f}%)"
        else:
            head += f" (more than the {tilde}{human_bytes(s.total)} expected)"
    parts = [head, *([speed] if speed else [])]
    left = eta(s.done, s.total, s.elapsed)
    if left is not None:
        parts.append(f"ETA {human_duration(left)}")
    return " · ".join(parts)


def line_due(*, now: float, last_line: float, interval: float, done: int,
             total: int | None, last_step: int) -> tuple[bool, int]:
    """Whether a log line is due, and the 10 % step the stream is at: every
    ``interval`` seconds, or at a new step of a known total but not within
    ``interval / 6`` of the previous line."""
    step = int(done / total / STEP) if total else 0
    since = now - last_line
    if since >= interval:
        return True, step
    if total and step > last_step and since >= interval / 6:
        return True, step
    return False, last_step


# -- the reporter ------------------------------------------------------------------------

class Progress:
    """One stream's progress; feed it with :meth:`add` (a chunk's size) or
    :meth:`update` (bytes so far) from any thread, then :meth:`finish`."""

    def __init__(self, label: str, *, total: int | None = None, estimate: bool = False,
                 interval: float = DEFAULT_INTERVAL,
                 bar: bool | None = None, clock: Clock = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.label = label
        self.total = total if total and total > 0 else None
        self.estimate = estimate
        self.interval = interval
        self.clock = clock
        self.done = 0
        self.lines = 0
        self.started = clock()
        self._last_line = self.started
        self._step = 0
        self._lock = threading.Lock()
        self._finished = False
        show = interactive() if bar is None else bar
        self._bar: _BarTask | None = _BarTask(label, self.total) if show else None

    def set_total(self, total: int | None, *, estimate: bool = False) -> None:
        """The total became known (a database's size once its snapshot is open)."""
        with self._lock:
            self.total = total if total and total > 0 else None
            self.estimate = estimate
            self._step = int(self.done / self.total / STEP) if self.total else 0
        if self._bar is not None:
            self._bar.set_total(self.total)

    def snapshot(self) -> Snapshot:
        return Snapshot(self.label, self.done, self.clock() - self.started, self.total,
                        self.estimate)

    def add(self, n: int) -> None:
        """``n`` more bytes went through."""
        self._advance(n, relative=True)

    def update(self, done: int) -> None:
        """``done`` bytes went through so far."""
        self._advance(done, relative=False)

    def _advance(self, n: int, *, relative: bool) -> None:
        with self._lock:
            self.done = self.done + n if relative else n
            done = self.done
            now = self.clock()
            due, self._step = line_due(now=now, last_line=self._last_line,
                                       interval=self.interval, done=done, total=self.total,
                                       last_step=self._step)
            if due:
                self._last_line = now
                self.lines += 1
        if due:
            self._emit(format_line(self.snapshot()))
        if self._bar is not None:
            self._bar.update(done)

    def finish(self) -> None:
        """The stream ended: a closing line if any line was written, the bar removed."""
        with self._lock:
            if self._finished:
                return
            self._finished = True
            closing = self.lines > 0
        if closing:
            self._emit(format_line(self.snapshot(), finished=True))
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.finish()

    def _emit(self, line: str) -> None:
        try:
            logger.info("%s", line)
        except Exception:  # a broken log handler must not break the stream
            logger.debug("progress line not logged", exc_info=True)


def interactive() -> bool:
    """A person is watching: stderr is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# -- the rich bar (only when interactive) ------------------------------------------------

class _Bars:
    """One ``rich`` live display shared by every stream in this process (rich allows
    one live display at a time); started with the first bar, stopped with the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.display: Any = None
        self.users = 0

    def open(self, label: str, total: int | None) -> Any:
        with self.lock:
            if self.display is None:
                self.display = RichProgress(
                    TextColumn("{task.description}"), BarColumn(),
                    DownloadColumn(binary_units=True), TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    console=Console(stderr=True), transient=True)
                self.display.start()
            self.users += 1
            return self.display.add_task(label, total=total)

    def close(self, task: Any) -> None:
        with self.lock:
            if self.display is None:
                return
            self.display.remove_task(task)
            self.users -= 1
            if self.users <= 0:
                self.display.stop()
                self.display, self.users = None, 0


_BARS = _Bars()


class _BarTask:
    def __init__(self, label: str, total: int | None) -> None:
        self.task: Any = None
        self.next_at = 0.0
        try:
            self.task = _BARS.open(label, total)
        except Exception:
            logger.debug("no progress bar", exc_info=True)

    def set_total(self, total: int | None) -> None:
        self._call(total=total)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now >= self.next_at:
            self.next_at = now + _BAR_REFRESH
            self._call(completed=done)

    def close(self) -> None:
        if self.task is not None:
            try:
                _BARS.close(self.task)
            except Exception:
                logger.debug("progress bar not closed", exc_info=True)
            self.task = None

    def _call(self, **kw: Any) -> None:
        display = _BARS.display
        if self.task is None or display is None:
            return
        try:
            display.update(self.task, **kw)
        except Exception:
            logger.debug("progress bar not updated", exc_info=True)
