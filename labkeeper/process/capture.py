"""Reading a child's output pipe in a thread: a capped, redacted copy and a
callback per line."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque

from labkeeper import log_setup
from labkeeper.process.result import STDERR_TAIL_LINES
from labkeeper.process.stage import LineCallback
from labkeeper.secrets import REDACTOR

log = logging.getLogger("labkeeper.process")

CAPTURE_LIMIT = 8 * 1024 * 1024  # bytes of stdout/stderr kept in a result
_LINE_CAP = 1 << 16  # longest line handed to a callback in one piece


class Capture:
    """Reads a pipe line by line in a thread: keeps a capped copy and calls back."""

    def __init__(self, stream: object, callback: LineCallback | None, name: str) -> None:
        self._stream = stream
        self._callback = callback
        self._chunks: list[bytes] = []
        self._size = 0
        self.truncated = False
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        # the line callback may log: it runs in the starter's run context
        self.thread = threading.Thread(target=log_setup.in_context(self._run), name=name,
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = self._stream
        # Lines are read with a cap so output without newlines stays bounded too.
        for raw in iter(lambda: stream.readline(_LINE_CAP), b""):  # type: ignore[attr-defined]
            if self._size + len(raw) <= CAPTURE_LIMIT:
                self._chunks.append(raw)
                self._size += len(raw)
            else:
                self.truncated = True
            if self._callback is not None:
                line = REDACTOR.redact(raw.decode("utf-8", "replace").rstrip("\r\n"))
                try:
                    self._callback(line)
                except Exception:  # a broken callback must not stall the pipe
                    log.exception("line callback failed")
        with contextlib.suppress(OSError):
            stream.close()  # type: ignore[attr-defined]

    def text(self) -> str:
        self.thread.join()
        data = b"".join(self._chunks).decode("utf-8", "replace")
        return REDACTOR.redact(data)
