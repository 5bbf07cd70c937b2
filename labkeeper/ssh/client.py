"""One authenticated connection (:class:`SshClient`): remote commands with
streaming output, and SFTP transfers."""

from __future__ import annotations

import contextlib
import io
import logging
import posixpath
import shlex
import stat as statmod
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Protocol

import paramiko

from labkeeper.errors import CommandTimeout, SSHConnectError
from labkeeper.process import (
    CAPTURE_LIMIT,
    GENERIC,
    CommandResult,
    ExitCodeTable,
    LineCallback,
    Outcome,
    check_argv,
    make_error,
)
from labkeeper.secrets import REDACTOR, redact
from labkeeper.ssh.channel import CHUNK, Lines, feed, pump, stop_remote, tail_text
from labkeeper.ssh.command import deadline_argv, env_argv, env_block, remote_command
from labkeeper.ssh.target import SshTarget

log = logging.getLogger("labkeeper.ssh")


@dataclass(frozen=True)
class RemoteStat:
    path: str
    size: int
    mode: int  # permission bits only (e.g. 0o600)
    is_dir: bool
    is_file: bool
    mtime: int
    uid: int
    gid: int


class _Writable(Protocol):
    def write(self, data: bytes, /) -> object: ...


Source = BinaryIO | bytes | bytearray | Iterable[bytes]
Sink = _Writable | Callable[[bytes], object]


class SshClient:
    """One authenticated connection. Thread-safe for :meth:`run` (one channel per
    command) and the SFTP helpers (one SFTP session per call)."""

    def __init__(self, target: SshTarget, client: paramiko.SSHClient) -> None:
        self.target = target
        self._client = client

    # -- connection -------------------------------------------------------------------
    @property
    def is_active(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SshClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHConnectError(f"ssh {self.target.name}: the connection is closed")
        return transport

    def _lost(self, what: str, exc: BaseException) -> SSHConnectError:
        return SSHConnectError(f"ssh {self.target.name}: {what}: "
                               f"{redact(str(exc)) or type(exc).__name__}")

    # -- commands ---------------------------------------------------------------------
    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        input: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        on_stdout_line: LineCallback | None = None,
        on_stderr_line: LineCallback | None = None,
        stdout_writer: Callable[[bytes], object] | None = None,
        codes: ExitCodeTable = GENERIC,
        check: bool = True,
        remote_deadline: bool = True,
        stdin: BinaryIO | None = None,
    ) -> CommandResult:
        """Run ``argv`` on the target and wait for it, at most ``timeout`` seconds.

        ``stdin``: a file whose data follows ``input`` on the command's stdin, sent
        as it arrives (one ``read`` at a time, for a conversation such as psql's),
        then EOF.

        ``input`` is written to the command's stdin (then EOF); ``env`` travels on
        stdin too (see :data:`~labkeeper.ssh.command.ENV_PREAMBLE`), never on the command line.
        ``stdout_writer`` receives the raw stdout bytes as they arrive (the
        result's ``stdout`` is then empty); otherwise stdout is kept up to
        ``CAPTURE_LIMIT`` bytes. Line callbacks see every (redacted) line.
        On timeout the channel is closed and :class:`CommandTimeout` is raised;
        the remote command is ended by the remote side itself (see
        :func:`deadline_argv`; ``remote_deadline=False`` turns that off, for hosts
        without a ``timeout`` program). A failing exit code raises
        the :func:`make_error` error unless ``check=False``.
        """
        shown, data, command = _invocation(argv, timeout=timeout, input=input, env=env,
                                           remote_deadline=remote_deadline)
        log.debug("ssh %s: running %s (timeout %gs)", self.target.name, shlex.join(shown),
                  timeout)

        started = time.monotonic()
        deadline = started + timeout
        chan = self._start(command)
        out = Lines(on_stdout_line, stdout_writer)
        err = Lines(on_stderr_line, None)
        status = self._exchange(chan, data, stdin, out, err, deadline=deadline, shown=shown,
                                timeout=timeout)
        duration = time.monotonic() - started
        result = self._result(shown, status, codes, out, err, duration)
        if check and not result.ok:
            raise make_error(result)
        return result

    def _start(self, command: str) -> paramiko.Channel:
        """A new channel running ``command``."""
        try:
            chan = self._transport().open_session(timeout=self.target.connect_timeout)
            chan.exec_command(command)
        except SSHConnectError:
            raise
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost("cannot start a command", exc) from None
        return chan

    def _exchange(self, chan: paramiko.Channel, data: bytes | None, stdin: BinaryIO | None,
                  out: Lines, err: Lines, *, deadline: float, shown: tuple[str, ...],
                  timeout: float) -> int:
        """Feed stdin (in a thread) and collect output until the command exits; its
        exit status. Past ``deadline``: :class:`CommandTimeout`. Closes the channel."""
        feeder = threading.Thread(target=feed, args=(chan, data, stdin), name="ssh-stdin",
                                  daemon=True)
        feeder.start()
        try:
            timed_out = not pump(chan, out, err, deadline)
            if timed_out:
                stop_remote(chan)
                raise CommandTimeout(
                    f"{shown[0]} timed out after {timeout:g}s on {self.target.name}",
                    argv=shown, timeout=timeout, stderr_tail=tail_text(err))
            out.finish()
            err.finish()
            status = chan.recv_exit_status()
        finally:
            chan.close()
            feeder.join(timeout=2)
        return status

    def _result(self, shown: tuple[str, ...], status: int, codes: ExitCodeTable,
                out: Lines, err: Lines, duration: float) -> CommandResult:
        """The finished command as a result; a status of -1 on a lost connection
        raises :class:`SSHConnectError`."""
        outcome: Outcome
        if status == -1:
            if not self.is_active:
                raise SSHConnectError(f"ssh {self.target.name}: connection lost while "
                                      f"running {shown[0]}")
            meaning, outcome = "no exit status (killed by a signal?)", "permanent"
        else:
            code = codes.classify(status)
            meaning, outcome = code.meaning, code.outcome
        if out.truncated:
            log.warning("ssh %s: stdout of %s exceeded %d bytes; the result keeps the start",
                        self.target.name, shown[0], CAPTURE_LIMIT)
        result = CommandResult(
            argv=shown, returncode=status, stdout=out.text(), stderr=err.text(),
            duration=duration, meaning=meaning, outcome=outcome, host=self.target.name,
        )
        log.debug("ssh %s: %s exited %d (%s) in %.2fs", self.target.name, shown[0], status,
                  meaning, duration)
        return result

    # -- SFTP -------------------------------------------------------------------------
    @contextlib.contextmanager
    def sftp(self, *, timeout: float = 120.0) -> Iterator[paramiko.SFTPClient]:
        """A fresh SFTP session (closed afterwards). ``timeout`` bounds each wait
        for the server; a stall raises :class:`SSHConnectError`. File errors stay
        ``OSError`` (``FileNotFoundError``, ``PermissionError``)."""
        transport = self._transport()
        try:
            client = paramiko.SFTPClient.from_transport(transport)
        except (paramiko.SSHException, EOFError) as exc:
            raise self._lost("cannot open SFTP", exc) from None
        if client is None:  # pragma: no cover - from_transport returns None on failure
            raise SSHConnectError(f"ssh {self.target.name}: cannot open SFTP")
        client.get_channel().settimeout(timeout)
        try:
            yield client
        except (paramiko.SSHException, EOFError, TimeoutError) as exc:
            raise self._lost("SFTP failed", exc) from None
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def put_stream(self, source: Source, remote_path: str, *, mode: int = 0o600,
                   timeout: float = 120.0) -> int:
        """Stream ``source`` (a binary file object, bytes, or an iterable of bytes)
        into ``remote_path`` atomically: it is written under a temporary name inside
        a private (0700) directory next to the target, given ``mode`` before any
        byte is written, and renamed over ``remote_path`` only when complete.
        Returns the number of bytes written."""
        parent = posixpath.dirname(remote_path) or "."
        name = posixpath.basename(remote_path)
        if not name:
            raise ValueError(f"remote path {remote_path!r} names a directory")
        tmpdir = posixpath.join(parent, f".{name}.labkeeper-{uuid.uuid4().hex[:12]}")
        tmp = posixpath.join(tmpdir, name)
        written = 0
        with self.sftp(timeout=timeout) as s:
            s.mkdir(tmpdir, mode=0o700)
            try:
                with s.open(tmp, "wb") as f:
                    f.chmod(mode)
                    f.set_pipelined(True)
                    for chunk in _chunks(source):
                        f.write(chunk)
                        written += len(chunk)
                s.posix_rename(tmp, remote_path)
            finally:
                with contextlib.suppress(OSError):
                    s.remove(tmp)
                with contextlib.suppress(OSError):
                    s.rmdir(tmpdir)
        log.debug("ssh %s: wrote %d bytes to %s (mode %o)", self.target.name, written,
                  remote_path, mode)
        return written

    def put_text(self, text: str, remote_path: str, *, mode: int = 0o600,
                 encoding: str = "utf-8", timeout: float = 120.0) -> int:
        """Write ``text`` to ``remote_path`` atomically (see :meth:`put_stream`)."""
        return self.put_stream(text.encode(encoding), remote_path, mode=mode, timeout=timeout)

    def get_stream(self, remote_path: str, writer: Sink, *, timeout: float = 120.0) -> int:
        """Stream ``remote_path`` into ``writer`` (an object with ``write(bytes)``
        or a callable). Returns the number of bytes read."""
        write = writer if callable(writer) else writer.write
        total = 0
        with self.sftp(timeout=timeout) as s, s.open(remote_path, "rb") as f:
            size = f.stat().st_size or 0
            f.prefetch(size, max_concurrent_requests=64)
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                write(chunk)
                total += len(chunk)
        return total

    def read_text(self, remote_path: str, *, encoding: str = "utf-8",
                  max_bytes: int = CAPTURE_LIMIT, timeout: float = 120.0) -> str:
        """The contents of a (small) remote text file."""
        buf = io.BytesIO()
        st = self.stat(remote_path, timeout=timeout)
        if st.size > max_bytes:
            raise ValueError(f"{remote_path} on {self.target.name} is {st.size} bytes, "
                             f"more than {max_bytes}")
        self.get_stream(remote_path, buf, timeout=timeout)
        return buf.getvalue().decode(encoding)

    def stat(self, remote_path: str, *, timeout: float = 120.0) -> RemoteStat:
        """``stat`` of a remote path; ``FileNotFoundError`` when it does not exist."""
        with self.sftp(timeout=timeout) as s:
            a = s.stat(remote_path)
        m = a.st_mode or 0
        return RemoteStat(path=remote_path, size=a.st_size or 0, mode=statmod.S_IMODE(m),
                          is_dir=statmod.S_ISDIR(m), is_file=statmod.S_ISREG(m),
                          mtime=a.st_mtime or 0, uid=a.st_uid or 0, gid=a.st_gid or 0)


SshSession = SshClient  # the name the design notes use


def _chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for i in range(0, len(view), CHUNK):
            yield bytes(view[i:i + CHUNK])
        return
    read = getattr(source, "read", None)
    if read is not None:
        while True:
            chunk = read(CHUNK)
            if not chunk:
                return
            if not isinstance(chunk, bytes | bytearray):
                raise TypeError("put_stream needs a binary file object")
            yield bytes(chunk)
    for chunk in source:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError(f"put_stream needs bytes chunks, got {type(chunk).__name__}")
        yield bytes(chunk)


def _invocation(argv: Sequence[str], *, timeout: float, input: bytes | str | None,
                env: Mapping[str, str] | None, remote_deadline: bool,
                ) -> tuple[tuple[str, ...], bytes | None, str]:
    """What :meth:`SshClient.run` sends: the redacted argv (for logs and errors),
    the stdin prefix (``env`` block, then ``input``) and the remote command line."""
    argv = tuple(argv)
    if isinstance(argv, str | bytes):  # pragma: no cover - tuple() of a str
        raise TypeError("argv must be a sequence of strings")
    check_argv(argv)
    if timeout is None or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    shown = REDACTOR.redact_argv(argv)
    data = input.encode("utf-8") if isinstance(input, str) else input
    remote_argv: tuple[str, ...] = argv
    if env:
        remote_argv = env_argv(argv)
        data = env_block(env) + (data or b"")
    if remote_deadline:
        remote_argv = deadline_argv(remote_argv, timeout)
    return shown, data, remote_command(remote_argv)
