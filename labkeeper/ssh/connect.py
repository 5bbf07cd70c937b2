"""Opening an authenticated, host-key-checked connection: private keys and
:func:`connect`."""

from __future__ import annotations

import io
import logging

import paramiko

from labkeeper.errors import HostKeyError, SSHAuthError, SSHConnectError, SSHError
from labkeeper.secrets import redact, resolve
from labkeeper.ssh.client import SshClient
from labkeeper.ssh.hostkeys import (
    PinnedKey,
    RejectUnknown,
    TrustOnFirstUse,
    key_fingerprint,
    pinned_fingerprint,
)
from labkeeper.ssh.target import SshTarget

log = logging.getLogger("labkeeper.ssh")

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


def connect(target: SshTarget) -> SshClient:
    """Open an authenticated, host-key-checked connection to ``target``.

    Raises :class:`HostKeyError` (unknown or changed host key, permanent),
    :class:`SSHAuthError` (key refused or unreadable, permanent) or
    :class:`SSHConnectError` (refused, timed out, reset: transient).
    """
    pkey = _private_key(target)
    client = _client_for(target)
    where = f"{target.user}@{target.host}:{target.port}"
    t = target.connect_timeout
    try:
        client.connect(
            target.host, port=target.port, username=target.user, pkey=pkey,
            timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
            allow_agent=False, look_for_keys=False,
        )
    except (HostKeyError, OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        if isinstance(exc, HostKeyError):
            raise
        raise _connect_error(target, exc, where) from None
    transport = client.get_transport()
    if transport is not None:
        transport.set_keepalive(30)
    log.debug("ssh %s: connected to %s", target.name, where)
    return SshClient(target, client)


def _private_key(target: SshTarget) -> paramiko.PKey:
    key_text = resolve(target.key).get_secret_value()
    passphrase = (resolve(target.key_passphrase).get_secret_value()
                  if target.key_passphrase else None)
    try:
        return load_private_key(key_text, passphrase)
    except SSHAuthError as exc:
        raise SSHAuthError(f"ssh {target.name}: key {target.key}: {exc}") from None


def _client_for(target: SshTarget) -> paramiko.SSHClient:
    """A paramiko client holding the target's host keys and host key policy."""
    client = paramiko.SSHClient()
    policy: paramiko.MissingHostKeyPolicy
    if target.host_key is not None:
        policy = PinnedKey(target, pinned_fingerprint(target.host_key))
    elif target.trust_on_first_use:
        policy = TrustOnFirstUse(target)
    else:
        policy = RejectUnknown(target)
    # "system" host keys are never written back by paramiko; TOFU appends itself.
    if target.host_key is None and target.known_hosts.exists():
        try:
            client.load_system_host_keys(str(target.known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise HostKeyError(f"ssh {target.name}: cannot read {target.known_hosts}: {exc}",
                               host=target.host_key_name) from None
    client.set_missing_host_key_policy(policy)
    return client


def _connect_error(target: SshTarget, exc: BaseException, where: str) -> SSHError:
    """The typed error for a failed ``SSHClient.connect`` (checked in this order)."""
    t = target.connect_timeout
    if isinstance(exc, paramiko.BadHostKeyException):
        offered, expected = key_fingerprint(exc.key), key_fingerprint(exc.expected_key)
        return HostKeyError(
            f"ssh {target.name}: HOST KEY CHANGED for {target.host_key_name}: it offered "
            f"{exc.key.get_name()} {offered}, {target.known_hosts} expects "
            f"{exc.expected_key.get_name()} {expected}. Someone may be intercepting the "
            f"connection, or the host was reinstalled; verify, then replace the entry "
            f"(ssh-keygen -R '{target.host_key_name}' -f {target.known_hosts})",
            host=target.host_key_name, fingerprint=offered)
    if isinstance(exc, paramiko.AuthenticationException):
        return SSHAuthError(f"ssh {where} ({target.name}): authentication failed: "
                            f"{redact(str(exc))}")
    if isinstance(exc, TimeoutError):
        return SSHConnectError(f"ssh {where} ({target.name}): timed out after {t:g}s"
                               f" ({exc or 'no answer'})")
    return SSHConnectError(f"ssh {where} ({target.name}): cannot connect: "
                           f"{redact(str(exc)) or type(exc).__name__}")
