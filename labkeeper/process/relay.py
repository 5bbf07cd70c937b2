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


def _grow_pipe(fd: int) -> None:
    import fcntl

    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)


class Relay(threading.Thread):
    """Moves bytes from a producer's stdout to a consumer's stdin; owns the EOF.

    Without a gate it splices (zero-copy); with one it copies through userspace and
    keeps the stream's last :data:`GATE_TAIL_BYTES` for the gate. ``writing_since``
    is set while data waits to be accepted by the consumer (for stall detection).
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
            off = 0
            while off < n:
                end = min(n, off + _WRITE_SLICE)
                self.writing_since = time.monotonic()
                try:
                    off += os.write(self.dst, view[off:end])
                except OSError:  # EPIPE: the consumer exited or was killed
                    self.consumer_gone = True
                    return
                finally:
                    self.writing_since = None
            self.bytes += n
            if self.on_bytes is not None:
                self.on_bytes(n)
            if n >= GATE_TAIL_BYTES:
                self.tail = bytes(view[n - GATE_TAIL_BYTES:n])
            else:
                self.tail = (self.tail + bytes(view[:n]))[-GATE_TAIL_BYTES:]
