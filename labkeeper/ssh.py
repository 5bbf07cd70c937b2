"""SSH runner (paramiko): strict host keys, remote commands with streaming output, SFTP.

Same result and error types as :mod:`labkeeper.process`: a remote command
returns a :class:`~labkeeper.process.CommandResult` (``host`` = the target's
name) and a failure raises the :class:`~labkeeper.errors.CommandError` built by
:func:`~labkeeper.process.make_error`.

Host keys
    Checked against the target's known_hosts file (plain or hashed entries),
    or against a key pinned in the inventory (``host_key``), which then wins.
    An unknown host is refused (:class:`~labkeeper.errors.HostKeyError`) unless
    the target says ``trust_on_first_use``; then its key is accepted once and
    appended to known_hosts. A *changed* key is always refused, TOFU or not.

The remote command line (the one place a shell string is built)
    SSH carries one command *string*, which the remote user's login shell
    parses. :func:`remote_command` builds it from an argv tuple with
    :func:`shlex.join`, so every element arrives as exactly one argument, with
    no expansion, whatever characters it holds. The remote login shell must be
    POSIX-compatible (sh, dash, bash, zsh; not fish or csh). Nothing else in
    labkeeper builds shell strings.

Secrets for remote commands
    Never on the command line (it is visible in the remote ``ps``/``/proc``).
    Two ways, both through the channel's stdin:

    - ``input=``: the command reads the secret from its standard input
      (``psql`` reading a script, ``restic --password-command cat``, ...).
    - ``env=``: variables are sent as ``NAME=value`` lines on stdin, ahead of
      ``input``, to a fixed ``sh -c`` preamble (:data:`ENV_PREAMBLE`) that
      exports them and then ``exec``\\ s the command, whose stdin continues
      with ``input``. We do *not* use the SSH ``env`` request: sshd refuses
      it unless ``AcceptEnv`` allows the name, and fails silently when not.

    Anything logged or raised (argv, stdout, stderr, messages) is masked with
    :func:`labkeeper.secrets.redact`.

Connections are reused per target within a flow run through :class:`SshPool`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import logging
import os
import posixpath
import re
import select
import shlex
import stat as statmod
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Protocol

import paramiko
from paramiko.common import cMSG_CHANNEL_REQUEST

from labkeeper.errors import (
    CommandTimeout,
    ConfigError,
    HostKeyError,
    SSHAuthError,
    SSHConnectError,
    SSHError,
)
from labkeeper.process import (
    CAPTURE_LIMIT,
    GENERIC,
    STDERR_TAIL_LINES,
    CommandResult,
    ExitCodeTable,
    LineCallback,
    check_argv,
    make_error,
)
from labkeeper.secrets import REDACTOR, check_reference, redact, resolve

log = logging.getLogger("labkeeper.ssh")

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CHUNK = 1 << 20
_RECV = 1 << 16

ENV_PREAMBLE = (
    'while IFS= read -r __lk_kv; do [ -z "$__lk_kv" ] && break; export "$__lk_kv"; done; '
    'unset __lk_kv; exec "$@"'
)
"""The fixed ``sh -c`` script that reads ``NAME=value`` lines from stdin up to an
empty line, exports them and execs the real argv (``"$@"``). Values are never
re-parsed by the shell (``export "$var"`` assigns the text as is); ``read``
consumes stdin byte by byte, so the rest of stdin reaches the command intact."""


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class SshTarget:
    """Where and how to log in. ``key`` (and ``key_passphrase``) are secret
    references (``file:/path``, ``env:NAME``, ``prefect-block:NAME``), resolved
    only when connecting."""

    name: str
    host: str
    key: str
    known_hosts: Path
    port: int = 22
    user: str = "root"
    trust_on_first_use: bool = False
    connect_timeout: float = 10.0
    key_passphrase: str | None = None
    host_key: str | None = None
    """A pinned host key (``ssh-ed25519 AAAA...`` or ``SHA256:...``). When set it
    is the only key accepted and known_hosts is not consulted."""

    @classmethod
    def from_spec(cls, spec: Any) -> SshTarget:
        """From the inventory's resolved target (``Inventory.ssh_targets()`` values:
        name, address, port, user, key, known_hosts, trust_on_first_use, host_key,
        connect_timeout)."""
        if not spec.key:
            raise ConfigError(f"ssh target {spec.name}: no key reference (set ssh.key)",
                              [f"{spec.name}: key missing"])
        return cls(
            name=str(spec.name), host=str(spec.address), key=str(spec.key),
            known_hosts=Path(spec.known_hosts), port=int(spec.port), user=str(spec.user),
            trust_on_first_use=bool(spec.trust_on_first_use),
            connect_timeout=float(spec.connect_timeout), host_key=spec.host_key,
        )

    def __post_init__(self) -> None:
        object.__setattr__(self, "known_hosts", Path(self.known_hosts))
        problems = []
        for label, ref in (("key", self.key), ("key_passphrase", self.key_passphrase)):
            if ref is None:
                continue
            try:
                check_reference(ref)
            except ValueError as exc:
                problems.append(f"{label}: {exc}")
        if not 0 < self.port < 65536:
            problems.append(f"port: {self.port} is not a TCP port")
        if not self.connect_timeout > 0:
            problems.append("connect_timeout: must be positive")
        if not self.host:
            problems.append("host: empty")
        if self.host_key is not None:
            try:
                pinned_fingerprint(self.host_key)
            except ValueError as exc:
                problems.append(f"host_key: {exc}")
        if problems:
            raise ConfigError(f"ssh target {self.name}: " + "; ".join(problems), problems)

    @property
    def host_key_name(self) -> str:
        """The name known_hosts uses for this host: ``host`` or ``[host]:port``."""
        return host_key_name(self.host, self.port)


# --------------------------------------------------------------------------- pure helpers


def remote_command(argv: Sequence[str]) -> str:
    """The one remote command string for ``argv``: each element quoted with
    :func:`shlex.join`, so it reaches the remote program as one argument."""
    argv = tuple(argv)
    check_argv(argv)
    return shlex.join(argv)


def env_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` wrapped in the :data:`ENV_PREAMBLE` that reads variables from stdin."""
    return ("sh", "-c", ENV_PREAMBLE, "labkeeper-env", *argv)


def env_block(env: Mapping[str, str]) -> bytes:
    """The stdin prefix carrying ``env`` for :data:`ENV_PREAMBLE`: ``NAME=value``
    lines and an empty line. Names must be shell identifiers; values may not hold
    newlines or NUL bytes."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"environment variable name {name!r} is not an identifier")
        if "\n" in value or "\r" in value or "\x00" in value:
            raise ValueError(f"environment variable {name}: value contains a newline or NUL")
        lines.append(f"{name}={value}\n")
    return ("".join(lines) + "\n").encode("utf-8")


REMOTE_KILL_AFTER = 5  # seconds between the remote SIGTERM and SIGKILL
REMOTE_DEADLINE_MARGIN = 1.0  # the remote deadline trails ours by this much


def deadline_argv(argv: Sequence[str], timeout: float) -> tuple[str, ...]:
    """``argv`` under the remote ``timeout`` program (coreutils or busybox).

    Closing an SSH channel does not stop a command started without a PTY, and
    OpenSSH refuses the "signal" request for root sessions (no privilege
    separation after a root login); so the remote side enforces the deadline:
    SIGTERM to the command's process group ``REMOTE_DEADLINE_MARGIN`` after our
    own deadline, SIGKILL ``REMOTE_KILL_AFTER`` seconds later. It also holds
    when the connection is lost mid-command."""
    seconds = f"{timeout + REMOTE_DEADLINE_MARGIN:.3f}".rstrip("0").rstrip(".")
    return ("timeout", "-s", "TERM", "-k", str(REMOTE_KILL_AFTER), seconds, *argv)


def host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key_blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob: ``SHA256:base64-no-padding``."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def key_fingerprint(key: paramiko.PKey) -> str:
    return fingerprint(key.asbytes())


def pinned_fingerprint(host_key: str) -> str:
    """The SHA256 fingerprint a pinned host key stands for (a public key line or
    the fingerprint itself)."""
    value = host_key.strip()
    if value.startswith("SHA256:"):
        if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}=?", value):
            raise ValueError("a fingerprint must look like SHA256:<43 base64 characters>")
        return value.rstrip("=")
    parts = value.split()
    if len(parts) < 2:
        raise ValueError("expected 'TYPE BASE64' or 'SHA256:...'")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except ValueError:
        raise ValueError("the key is not valid base64") from None
    return fingerprint(blob)


def known_hosts_line(name: str, key_type: str, key_base64: str, *, hashed: bool = False,
                     salt: bytes | None = None) -> str:
    """One known_hosts entry. ``hashed`` writes the ``|1|salt|hmac`` form
    (OpenSSH's ``HashKnownHosts``)."""
    if any(c.isspace() for c in name) or not name:
        raise ValueError(f"bad known_hosts host name {name!r}")
    base64.b64decode(key_base64, validate=True)  # a corrupted key is refused early
    shown = paramiko.HostKeys.hash_host(name, salt) if hashed else name
    return f"{shown} {key_type} {key_base64}"


def append_known_host(path: Path, line: str) -> None:
    """Append one entry to a known_hosts file (created 0600 with its directory
    if missing), starting on a fresh line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = os.fstat(fd).st_size
        prefix = b""
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                prefix = b"\n"
        os.write(fd, prefix + line.encode("ascii") + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


_KEY_CLASSES: tuple[type[paramiko.PKey], ...] = (
    paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey)


def load_private_key(text: str, passphrase: str | None = None) -> paramiko.PKey:
    """A paramiko key from private key text (OpenSSH or PEM; ed25519, ECDSA, RSA).
    Raises :class:`SSHAuthError` without echoing any of the text."""
    if not text.endswith("\n"):
        text += "\n"
    for cls in _KEY_CLASSES:
        try:
            return cls.from_private_key(io.StringIO(text), password=passphrase)
        except paramiko.PasswordRequiredException:
            raise SSHAuthError("the private key is encrypted and no passphrase was given") \
                from None
        except (paramiko.SSHException, ValueError, TypeError, IndexError):
            continue
    raise SSHAuthError("the private key could not be read (not an ed25519, ECDSA or RSA "
                       "private key in OpenSSH/PEM format, or a wrong passphrase)")


class _Lines:
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


# --------------------------------------------------------------------------- host key policies


class _Reject(paramiko.MissingHostKeyPolicy):
    def __init__(self, target: SshTarget) -> None:
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        fp = key_fingerprint(key)
        t = self.target
        raise HostKeyError(
            f"ssh {t.name}: host {hostname} is not in {t.known_hosts} (it offered "
            f"{key.get_name()} {fp}); check the fingerprint on the host "
            f"(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub), then add it to known_hosts "
            f"or set trust_on_first_use for this host",
            host=hostname, fingerprint=fp)


class _TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
    """Accepts a host that known_hosts does not name at all, and records it.
    (A host whose key *changed* never reaches a policy: paramiko raises
    ``BadHostKeyException`` for it.)"""

    def __init__(self, target: SshTarget) -> None:
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        line = known_hosts_line(hostname, key.get_name(), key.get_base64())
        append_known_host(self.target.known_hosts, line)
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("ssh %s: trusted %s on first use (%s %s), recorded in %s",
                    self.target.name, hostname, key.get_name(), key_fingerprint(key),
                    self.target.known_hosts)


class _Pinned(paramiko.MissingHostKeyPolicy):
    """Accepts exactly the pinned key (the client holds no other host keys)."""

    def __init__(self, target: SshTarget, expected: str) -> None:
        self.target = target
        self.expected = expected

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        fp = key_fingerprint(key)
        if fp != self.expected:
            raise HostKeyError(
                f"ssh {self.target.name}: HOST KEY CHANGED for {hostname}: it offered "
                f"{key.get_name()} {fp}, the inventory pins {self.expected}. Someone may be "
                f"intercepting the connection, or the host was reinstalled; verify, then "
                f"update host_key", host=hostname, fingerprint=fp)


# --------------------------------------------------------------------------- connecting


def connect(target: SshTarget) -> SshClient:
    """Open an authenticated, host-key-checked connection to ``target``.

    Raises :class:`HostKeyError` (unknown or changed host key, permanent),
    :class:`SSHAuthError` (key refused or unreadable, permanent) or
    :class:`SSHConnectError` (refused, timed out, reset: transient).
    """
    key_text = resolve(target.key).get_secret_value()
    passphrase = (resolve(target.key_passphrase).get_secret_value()
                  if target.key_passphrase else None)
    try:
        pkey = load_private_key(key_text, passphrase)
    except SSHAuthError as exc:
        raise SSHAuthError(f"ssh {target.name}: key {target.key}: {exc}") from None

    client = paramiko.SSHClient()
    policy: paramiko.MissingHostKeyPolicy
    if target.host_key is not None:
        policy = _Pinned(target, pinned_fingerprint(target.host_key))
    elif target.trust_on_first_use:
        policy = _TrustOnFirstUse(target)
    else:
        policy = _Reject(target)
    # "system" host keys are never written back by paramiko; TOFU appends itself.
    if target.host_key is None and target.known_hosts.exists():
        try:
            client.load_system_host_keys(str(target.known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"ssh {target.name}: cannot read {target.known_hosts}: {exc}",
                               host=target.host_key_name) from None
    client.set_missing_host_key_policy(policy)
    where = f"{target.user}@{target.host}:{target.port}"
    t = target.connect_timeout
    try:
        client.connect(
            target.host, port=target.port, username=target.user, pkey=pkey,
            timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
            allow_agent=False, look_for_keys=False,
        )
    except HostKeyError:
        client.close()
        raise
    except paramiko.BadHostKeyException as exc:
        client.close()
        offered, expected = key_fingerprint(exc.key), key_fingerprint(exc.expected_key)
        raise HostKeyError(
            f"ssh {target.name}: HOST KEY CHANGED for {target.host_key_name}: it offered "
            f"{exc.key.get_name()} {offered}, {target.known_hosts} expects "
            f"{exc.expected_key.get_name()} {expected}. Someone may be intercepting the "
            f"connection, or the host was reinstalled; verify, then replace the entry "
            f"(ssh-keygen -R '{target.host_key_name}' -f {target.known_hosts})",
            host=target.host_key_name, fingerprint=offered) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise SSHAuthError(f"ssh {where} ({target.name}): authentication failed: "
                           f"{redact(str(exc))}") from None
    except TimeoutError as exc:
        client.close()
        raise SSHConnectError(f"ssh {where} ({target.name}): timed out after {t:g}s"
                              f" ({exc or 'no answer'})") from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        raise SSHConnectError(f"ssh {where} ({target.name}): cannot connect: "
                              f"{redact(str(exc)) or type(exc).__name__}") from None
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(30)
    log.debug("ssh %s: connected to %s", target.name, where)
    return SshClient(target, client)


# --------------------------------------------------------------------------- the client


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
        stdin too (see the module docstring), never on the command line.
        ``stdout_writer`` receives the raw stdout bytes as they arrive (the
        result's ``stdout`` is then empty); otherwise stdout is kept up to
        ``CAPTURE_LIMIT`` bytes. Line callbacks see every (redacted) line.
        On timeout the channel is closed and :class:`CommandTimeout` is raised;
        the remote command is ended by the remote side itself (see
        :func:`deadline_argv`; ``remote_deadline=False`` turns that off, for hosts
        without a ``timeout`` program). A failing exit code raises
        the :func:`make_error` error unless ``check=False``.
        """
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
        command = remote_command(remote_argv)
        log.debug("ssh %s: running %s (timeout %gs)", self.target.name, shlex.join(shown),
                  timeout)

        started = time.monotonic()
        deadline = started + timeout
        try:
            chan = self._transport().open_session(timeout=self.target.connect_timeout)
            chan.exec_command(command)
        except SSHConnectError:
            raise
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise self._lost("cannot start a command", exc) from None

        out = _Lines(on_stdout_line, stdout_writer)
        err = _Lines(on_stderr_line, None)
        feeder = threading.Thread(target=_feed, args=(chan, data, stdin), name="ssh-stdin",
                                  daemon=True)
        feeder.start()
        try:
            timed_out = not _pump(chan, out, err, deadline)
            if timed_out:
                _stop_remote(chan)
                raise CommandTimeout(
                    f"{shown[0]} timed out after {timeout:g}s on {self.target.name}",
                    argv=shown, timeout=timeout, stderr_tail=_tail(err))
            out.finish()
            err.finish()
            status = chan.recv_exit_status()
        finally:
            chan.close()
            feeder.join(timeout=2)
        duration = time.monotonic() - started

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
        if check and not result.ok:
            raise make_error(result)
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
        client.get_channel().settimeout(timeout)  # type: ignore[union-attr]
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
                chunk = f.read(_CHUNK)
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


# --------------------------------------------------------------------------- channel plumbing


def _feed(chan: paramiko.Channel, data: bytes | None, stream: BinaryIO | None = None) -> None:
    """Write stdin (if any), then ``stream`` as it arrives, then EOF; stops quietly
    when the channel goes away."""
    try:
        if data:
            view = memoryview(data)
            for i in range(0, len(view), _CHUNK):
                chan.sendall(view[i:i + _CHUNK])
        while stream is not None:
            chunk = os.read(stream.fileno(), _RECV)
            if not chunk:
                break
            chan.sendall(chunk)
        chan.shutdown_write()
    except (OSError, EOFError, paramiko.SSHException):
        pass


def _pump(chan: paramiko.Channel, out: _Lines, err: _Lines, deadline: float) -> bool:
    """Move output to the collectors until the command has exited and its output
    ended. Returns False when the deadline passed first."""
    fd = chan.fileno()  # readable whenever stdout or stderr has data (or at EOF)
    while True:
        while chan.recv_ready():
            out.feed(chan.recv(_RECV))
        while chan.recv_stderr_ready():
            err.feed(chan.recv_stderr(_RECV))
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
    chan.transport._send_user_message(m)  # type: ignore[union-attr]


def _stop_remote(chan: paramiko.Channel) -> None:
    """Ask sshd to SIGTERM a command that overran (honoured for non-root logins;
    the remote ``timeout`` wrapper covers the rest); the caller closes the channel."""
    with contextlib.suppress(Exception):
        _send_signal(chan, "TERM")


def _tail(lines: _Lines) -> str:
    text = lines.text()
    return "\n".join(text.splitlines()[-STDERR_TAIL_LINES:])


def _chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for i in range(0, len(view), _CHUNK):
            yield bytes(view[i:i + _CHUNK])
        return
    read = getattr(source, "read", None)
    if read is not None:
        while True:
            chunk = read(_CHUNK)
            if not chunk:
                return
            if not isinstance(chunk, bytes | bytearray):
                raise TypeError("put_stream needs a binary file object")
            yield bytes(chunk)
    for chunk in source:  # type: ignore[union-attr]
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError(f"put_stream needs bytes chunks, got {type(chunk).__name__}")
        yield bytes(chunk)


# --------------------------------------------------------------------------- the pool


class SshPool:
    """Connections reused per target within a flow run; closes all on exit.

    ``get(target)`` returns the same connected client for the same target
    (targets are frozen and compare by value) and reconnects if the connection
    dropped. Thread-safe: concurrent first calls for one target connect once.
    """

    def __init__(self, connector: Callable[[SshTarget], SshClient] = connect) -> None:
        self._connector = connector
        self._clients: dict[SshTarget, SshClient] = {}
        self._locks: dict[SshTarget, threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.connects = 0

    def get(self, target: SshTarget) -> SshClient:
        with self._lock:
            if self._closed:
                raise SSHError("the SSH pool is closed")
            lock = self._locks.setdefault(target, threading.Lock())
        with lock:
            client = self._clients.get(target)
            if client is not None and client.is_active:
                return client
            if client is not None:
                client.close()
            client = self._connector(target)
            with self._lock:
                self._clients[target] = client
                self.connects += 1
            return client

    def __len__(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    def __enter__(self) -> SshPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
