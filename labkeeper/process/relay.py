"""The relay between two pipeline stages: moves a producer's stdout to its
consumer's stdin and owns the consumer's end-of-stream (see :mod:`.engine`)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from typing import TYPE_CHECKING

from labkeeper import log_setup
from labkeeper.process.stage import EofGate

if TYPE_CHECKING:
    from labkeeper.process.engine import PipelineRun

log = logging.getLogger("labkeeper.process")

_SPLICE_CHUNK = 1 << 20
GATE_TAIL_BYTES = 4096  # bytes of a gated stream's end handed to its gate
_COPY_CHUNK = 1 << 20  # read size of a userspace (gated) relay
_WRITE_SLICE = 1 << 18  # write size of a userspace relay: stall detection granularity
_PIPE_SIZE = 1 << 20  # gated relays grow their pipes to this (F_SETPIPE_SZ)
_F_SETPIPE_SZ = 1031
_BURST_WAIT = 0.001  # a gated splice relay's wait for more than a tail's worth of bytes


def _readable_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    import fcntl
    import struct
    import termios

    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _hung_up(events: list[tuple[int, int]]) -> bool:
    return any(ev & (select.POLLHUP | select.POLLERR) for _fd, ev in events)


def _grow_pipe(fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


class Relay(threading.Thread):
    """Moves bytes from a producer's stdout to a consumer's stdin; owns the EOF.

    Without a gate it splices (zero-copy). With one it splices too, but only while at
    least :data:`GATE_TAIL_BYTES` more bytes wait in the pipe behind what it moves: the
    stream's last bytes always come through userspace, where the gate gets them
    (``_copy`` does it all in userspace where splice is missing). ``writing_since`` is
    set while data waits to be accepted by the consumer (for stall detection).
    """

    def __init__(self, index: int, src: int, dst: int, run: PipelineRun, *,
                 gate: EofGate | None, watch: bool) -> None:
        super().__init__(name=f"relay-{index}", daemon=True)
        self.index = index
        self.src = src
        self.dst = dst
        self.run_ = run
        self.gate = gate
        self.watch = watch
        self.bytes = 0
        self.tail = b""
        self.on_bytes = run.stages[index].on_bytes
        self.writing_since: float | None = None
        self.consumer_gone = False
        self.refused: str | None = None
        self.eof_given = False
        # an ``on_bytes`` callback may log (progress lines): in the starter's run context
        self._body = log_setup.in_context(self._relay)

    def run(self) -> None:
        self._body()

    def _relay(self) -> None:
        try:
            if self.gate is not None:
                if not (hasattr(os, "splice") and self._splice_gated()):
                    self._copy()
            else:
                self._pump()
        except BaseException as exc:  # never hand out EOF of a stream we lost track of
            log.exception("relay %d failed", self.index + 1)
            self.refused = f"relay error: {exc}"
        finally:
            self.writing_since = None
            self.run_.producer_done(self.index, self)

    def _pump(self) -> None:
        use_splice = hasattr(os, "splice")
        poller = None
        if self.watch:
            # Wait for input outside the stall clock: splice blocks on either end.
            poller = select.poll()
            poller.register(self.src, select.POLLIN)
        while True:
            if poller is not None:
                poller.poll()
                self.writing_since = time.monotonic()
            try:
                if use_splice:
                    n = os.splice(self.src, self.dst, _SPLICE_CHUNK)
                else:  # pragma: no cover - non-Linux
                    data = os.read(self.src, _SPLICE_CHUNK)
                    n = len(data)
                    if n:
                        os.write(self.dst, data)
            except BrokenPipeError:
                self.consumer_gone = True
                return
            except OSError as exc:
                if use_splice and exc.errno in (22, 38):  # EINVAL/ENOSYS: fall back
                    use_splice = False
                    continue
                self.consumer_gone = True
                return
            finally:
                self.writing_since = None
            if n == 0:
                return
            self._moved(n)

    def _splice_gated(self) -> bool:
        """Splice what is followed by :data:`GATE_TAIL_BYTES` more bytes in the pipe;
        read the rest (a short burst, the stream's end) into :attr:`tail`. Measured at
        pgbench scale 100 (≈1 GB): a userspace copy costs ≈0.3 s more CPU (issue 24).
        False, before anything moved, where this kernel cannot splice these fds."""
        _grow_pipe(self.src)
        _grow_pipe(self.dst)
        poller = select.poll()
        poller.register(self.src, select.POLLIN)
        moved_any = False
        while True:
            events = poller.poll()
            waiting = _readable_bytes(self.src)
            if waiting <= GATE_TAIL_BYTES and not _hung_up(events):
                # a short burst: let more arrive (at ≈250 MB/s a millisecond is ≈250 KB)
                # rather than moving it in small pieces; then it goes by userspace
                time.sleep(_BURST_WAIT)
                waiting = _readable_bytes(self.src)
            if waiting > GATE_TAIL_BYTES:
                n = self._splice_some(waiting - GATE_TAIL_BYTES)
                if n is None:
                    if moved_any:
                        raise OSError("splice stopped working mid-stream")
                    return False
                moved_any = True
                if n < 0:
                    return True  # the consumer is gone
                self.tail = b""  # what was moved comes after it
            elif not self._copy_burst(waiting):
                return True  # end of stream, or the consumer is gone

    def _splice_some(self, count: int) -> int | None:
        """Bytes spliced (>0); -1 when the consumer is gone; None when splice is not
        supported for these fds."""
        self.writing_since = time.monotonic()
        try:
            n = os.splice(self.src, self.dst, count)
        except BrokenPipeError:
            self.consumer_gone = True
            return -1
        except OSError as exc:
            if exc.errno in (22, 38):  # EINVAL/ENOSYS
                return None
            self.consumer_gone = True
            return -1
        finally:
            self.writing_since = None
        self._moved(n)
        return n

    def _copy_burst(self, waiting: int) -> bool:
        """Read what waits (at least one read) into userspace, keep its end as the tail,
        write it on; False at end of stream or when the consumer is gone."""
        data = os.read(self.src, min(max(waiting, 1), _COPY_CHUNK))
        if not data:
            return False
        if not self._write_all(memoryview(data)):
            return False
        self._moved(len(data))
        self.tail = (self.tail + data)[-GATE_TAIL_BYTES:]
        return True

    def _write_all(self, view: memoryview) -> bool:
        off = 0
        while off < len(view):
            self.writing_since = time.monotonic()
            try:
                off += os.write(self.dst, view[off:off + _WRITE_SLICE])
            except OSError:  # EPIPE: the consumer exited or was killed
                self.consumer_gone = True
                return False
            finally:
                self.writing_since = None
        return True

    def _moved(self, n: int) -> None:
        self.bytes += n
        if self.on_bytes is not None:
            self.on_bytes(n)

    def _copy(self) -> None:
        _grow_pipe(self.src)
        _grow_pipe(self.dst)
        buf = bytearray(_COPY_CHUNK)
        view = memoryview(buf)
        while True:
            n = os.readv(self.src, [buf])
            if n == 0:
                return
            if not self._write_all(view[:n]):
                return
            self._moved(n)
            if n >= GATE_TAIL_BYTES:
                self.tail = bytes(view[n - GATE_TAIL_BYTES:n])
            else:
                self.tail = (self.tail + bytes(view[:n]))[-GATE_TAIL_BYTES:]
