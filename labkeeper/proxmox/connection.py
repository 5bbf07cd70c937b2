"""Connecting to the Proxmox API: token or ticket login, TLS always verified.

Verification is by the system CA store, a CA file, or a pinned SHA-256 certificate
fingerprint (what PVE shows under Certificates); there is no way to turn it off
silently, and a pinned session refuses every URL the pin does not cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from labkeeper.errors import ConfigError, ServiceError
from labkeeper.proxmox.client import call
from labkeeper.secrets import resolve


class ProxmoxSpec(Protocol):
    """What the adapter needs from the inventory's ``proxmox`` section (read only)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def token_id(self) -> str: ...
    @property
    def token_secret(self) -> str: ...
    @property
    def timeout(self) -> float:
        """Seconds per API request."""
        ...
    @property
    def tls(self) -> Any: ...


@dataclass(frozen=True)
class TlsOptions:
    """How to verify the API certificate (the shape of the inventory's ``proxmox.tls``)."""

    verify: bool = True
    ca_file: str | None = None
    fingerprint: str | None = None


@dataclass(frozen=True)
class ConnectionSpec:
    """A :class:`ProxmoxSpec` built by hand, for tools that have no inventory yet
    (``labkeeper init``)."""

    host: str
    port: int
    token_id: str
    token_secret: str
    timeout: int
    tls: Any


class FingerprintAdapter(HTTPAdapter):
    """Accept exactly the certificate with this SHA-256 fingerprint (pinning)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = normalise_fingerprint(fingerprint)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(*args, **kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        # The CA chain is not consulted: the pinned fingerprint is the trust anchor
        # (urllib3 checks it on every connection and fails closed on a mismatch).
        kwargs["verify"] = False
        return super().send(request, *args, **kwargs)


def normalise_fingerprint(fp: str) -> str:
    hexdigits = fp.replace(":", "").strip().lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ConfigError(f"proxmox.tls.fingerprint: not a SHA-256 fingerprint: {fp!r}")
    return hexdigits


def format_fingerprint(fp: str) -> str:
    """A SHA-256 fingerprint the way PVE shows it: ``AA:BB:...`` (checked first)."""
    digits = normalise_fingerprint(fp).upper()
    return ":".join(digits[i:i + 2] for i in range(0, 64, 2))


def split_token_id(token_id: str) -> tuple[str, str]:
    """``user@realm!name`` → (``user@realm``, ``name``)."""
    user, sep, name = token_id.partition("!")
    if not sep or "@" not in user or not name:
        raise ConfigError(f"proxmox.token_id: expected USER@REALM!TOKENNAME, got {token_id!r}")
    return user, name


def _tls_verify(tls: Any) -> tuple[bool | str, str | None]:
    """(requests' ``verify`` value, pinned fingerprint or None) — refuses no verification."""
    fingerprint = getattr(tls, "fingerprint", None)
    ca_file = getattr(tls, "ca_file", None)
    verify_flag = getattr(tls, "verify", True)
    if fingerprint:
        return False, fingerprint  # replaced by the pinning adapter
    if not verify_flag:
        raise ConfigError("proxmox.tls: verify is false and no fingerprint is pinned; "
                          "refusing an unverified connection")
    return (str(ca_file) if ca_file else True), None


def connect_lab(spec: ProxmoxSpec | None) -> Any:
    """:func:`connect` to the inventory's ``proxmox`` section, which must be there."""
    if spec is None:
        raise ConfigError("the inventory has no proxmox section")
    return connect(spec)


def connect(spec: ProxmoxSpec) -> Any:
    """A ``ProxmoxAPI`` for the inventory's Proxmox, TLS verified, token auth."""
    from proxmoxer import ProxmoxAPI

    user, token_name = split_token_id(spec.token_id)
    secret = resolve(spec.token_secret).get_secret_value()
    verify, fingerprint = _tls_verify(spec.tls)
    api = ProxmoxAPI(spec.host, port=spec.port, user=user, token_name=token_name,
                     token_value=secret, verify_ssl=verify, timeout=spec.timeout,
                     service="PVE")
    if fingerprint:
        pin_session(api._store["session"], api._store["base_url"], fingerprint)
    return api


class RefusingAdapter(HTTPAdapter):
    """Refuses every request: mounted under the pinning adapter so a URL that does
    not resolve to the pin never falls through to an unverified connection."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        raise ServiceError(f"proxmox: refusing {request.url}: not under the pinned base URL",
                           service="proxmox", transient=False)


def pin_session(session: requests.Session, base_url: str, fingerprint: str) -> None:
    """Route ``base_url`` (exactly as proxmoxer builds it: IPv6 hosts bracketed)
    through the pinning adapter and every other URL to a refusal; then check that
    the session resolves an API URL to the pin, failing closed (ConfigError)."""
    pin = FingerprintAdapter(fingerprint)
    session.mount("https://", RefusingAdapter())
    session.mount("http://", RefusingAdapter())
    session.mount(base_url.rstrip("/") + "/", pin)
    probe = base_url.rstrip("/") + "/version"
    if session.get_adapter(probe) is not pin:
        raise ConfigError(f"proxmox.tls: the pinned fingerprint would not apply to {probe}; "
                          "refusing an unpinned connection")


def connect_password(spec: ProxmoxSpec, user: str, password_ref: str) -> Any:
    """A ``ProxmoxAPI`` logged in with a ticket (``POST /access/ticket``) as ``user``.

    For tools and rehearsals; flows use API tokens (:func:`connect`). proxmoxer
    fetches the ticket outside the session, so a pinned fingerprint cannot protect
    that request: ticket logins need the system CAs or a CA file.
    """
    from proxmoxer import ProxmoxAPI
    from proxmoxer.core import AuthenticationError

    verify, fingerprint = _tls_verify(spec.tls)
    if fingerprint:
        raise ConfigError("proxmox: ticket login needs tls.ca_file or the system CAs "
                          "(a pinned fingerprint cannot protect the ticket request)")
    password = resolve(password_ref).get_secret_value()
    try:
        return call(ProxmoxAPI, spec.host, port=spec.port, user=user, password=password,
                    verify_ssl=verify, timeout=spec.timeout, service="PVE",
                    what="POST /access/ticket")
    except AuthenticationError:
        raise ServiceError(f"proxmox POST /access/ticket: HTTP 401 authentication failure "
                           f"for {user}", service="proxmox", status=401,
                           transient=False) from None
