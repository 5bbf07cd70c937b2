"""Host keys: fingerprints, known_hosts entries, and the policies that accept or
refuse a host's key.

A host is checked against its known_hosts file (plain or hashed entries), or
against a key pinned in the inventory, which then wins. An unknown host is refused
unless the target says ``trust_on_first_use``; then its key is accepted once and
appended to known_hosts. A *changed* key is always refused, TOFU or not.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from labkeeper.errors import HostKeyError

if TYPE_CHECKING:
    from labkeeper.ssh.target import SshTarget

log = logging.getLogger("labkeeper.ssh")


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


class RejectUnknown(paramiko.MissingHostKeyPolicy):
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


class TrustOnFirstUse(paramiko.MissingHostKeyPolicy):
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


class PinnedKey(paramiko.MissingHostKeyPolicy):
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
