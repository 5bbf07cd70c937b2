"""One command's channel: stdin fed in a thread, stdout/stderr collected (capped,
redacted, line callbacks) until exit or deadline, and a stop request on overrun."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST

from labkeeper.process import CAPTURE_LIMIT, STDERR_TAIL_LINES, LineCallback
from labkeeper.secrets import REDACTOR, redact

log = logging.getLogger("labkeeper.ssh")

CHUNK = 1 << 20
RECV = 1 << 16


class Lines:
    """Collects one output stream: a capped copy, a tail, and a callback per line."""

    def __init__(self, callback: LineCallback | None, writer: Callable[[bytes], object] | None,
                 ) -> None:
        self.callback = callback
        self.writer = writer
        self.chunks: list[bytes] = []
        self.size = 0
        self.total = 0
        self.truncated = False
        self.partial = b""
        self.tail: deque[bytes] = deque(maxlen=STDERR_TAIL_LINES)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.total += len(data)
        if self.writer is not None:
            self.writer(data)
        elif self.size < CAPTURE_LIMIT:
            self.chunks.append(data)
            self.size += len(data)
        else:
            self.truncated = True
        if self.callback is None:
            return
        data = self.partial + data
        lines = data.split(b"\n")
        self.partial = lines.pop()
        for raw in lines:
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        assert self.callback is not None
        line = REDACTOR.redact(raw.rstrip(b"\r").decode("utf-8", "replace"))
        try:
            self.callback(line)
        except Exception:  # a broken callback must not stall the channel
            log.exception("line callback failed")

    def finish(self) -> None:
        if self.callback is not None and self.partial:
            self._emit(self.partial)
        self.partial = b""

    def text(self) -> str:
        return redact(b"".join(self.chunks).decode("utf-8", "replace"))


def feed(chan: paramiko.Channel, data: bytes | None, stream: BinaryIO | None = None) -> None:
    """Write stdin (if any), then ``stream`` as it arrives, then EOF; stops quietly
    when the channel goes away."""
    try:
        if data:
            view = memoryview(data)
            for i in range(0, len(view), CHUNK):
                chan.sendall(view[i:i + CHUNK])
        while stream is not None:
            chunk = os.read(stream.fileno(), RECV)
            if not chunk:
                break
            chan.sendall(chunk)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass


def pump(chan: paramiko.Channel, out: Lines, err: Lines, deadline: float) -> bool:
    """Move output to the collectors until the command has exited and its output
    ended. Returns False when the deadline passed first."""
    fd = chan.fileno()  # readable whenever stdout or stderr has data (or at EOF)
    while True:
        while chan.recv_ready():
            out.feed(chan.recv(RECV))
        while chan.recv_stderr_ready():
            err.feed(chan.recv_stderr(RECV))
        ended = chan.eof_received or chan.closed
        if ended and chan.exit_status_ready():
            if not chan.recv_ready() and not chan.recv_stderr_ready():
                return True
            continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        if ended:
            # Output is over; only the exit status is missing (the pipe stays readable).
            chan.status_event.wait(min(remaining, 0.05))
            if chan.closed and not chan.exit_status_ready():
                return True  # closed without a status: recv_exit_status gives -1
        else:
            select.select([fd], [], [], min(remaining, 0.5))


def _send_signal(chan: paramiko.Channel, name: str) -> None:
    """RFC 4254 §6.9 "signal" request; OpenSSH's sshd delivers it to the command's
    process group. (paramiko has no public method for it.)"""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string("signal")
    m.add_boolean(False)
    m.add_string(name)
    chan.transport._send_user_message(m)


def stop_remote(chan: paramiko.Channel) -> None:
    """Ask sshd to SIGTERM a command that overran (honoured for non-root logins;
    the remote ``timeout`` wrapper covers the rest); the caller closes the channel."""
    with contextlib.suppress(Exception):
        _send_signal(chan, "TERM")


def tail_text(lines: Lines) -> str:
    text = lines.text()
    return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])
