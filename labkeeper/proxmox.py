"""Typed Proxmox VE operations on proxmoxer's HTTPS backend.

TLS is always verified: by the system CA store, by a CA file, or by a pinned
SHA-256 certificate fingerprint (what PVE shows under Certificates). There is
no way to turn verification off silently.

API errors are typed: 5xx and connection failures are transient, 4xx permanent.
"""

from __future__ import annotations

from typing import Any, Protocol

import requests
from requests.adapters import HTTPAdapter

from labkeeper.errors import ConfigError, ServiceError
from labkeeper.secrets import redact, resolve


class ProxmoxSpec(Protocol):
    """What the adapter needs from the inventory's ``proxmox`` section."""

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


def split_token_id(token_id: str) -> tuple[str, str]:
    """``user@realm!name`` → (``user@realm``, ``name``)."""
    user, sep, name = token_id.partition("!")
    if not sep or "@" not in user or not name:
        raise ConfigError(f"proxmox.token_id: expected USER@REALM!TOKENNAME, got {token_id!r}")
    return user, name


def connect(spec: ProxmoxSpec) -> Any:
    """A ``ProxmoxAPI`` for the inventory's Proxmox, TLS verified, token auth."""
    from proxmoxer import ProxmoxAPI

    user, token_name = split_token_id(spec.token_id)
    secret = resolve(spec.token_secret).get_secret_value()
    tls = spec.tls
    fingerprint = getattr(tls, "fingerprint", None)
    ca_file = getattr(tls, "ca_file", None)
    verify_flag = getattr(tls, "verify", True)
    if fingerprint:
        verify: bool | str = False  # replaced by the pinning adapter below
    elif not verify_flag:
        raise ConfigError("proxmox.tls: verify is false and no fingerprint is pinned; "
                          "refusing an unverified connection")
    else:
        verify = str(ca_file) if ca_file else True
    api = ProxmoxAPI(spec.host, port=spec.port, user=user, token_name=token_name,
                     token_value=secret, verify_ssl=verify, timeout=spec.timeout,
                     service="PVE")
    if fingerprint:
        session = api._store["session"]
        session.mount(f"https://{spec.host}:{spec.port}/", FingerprintAdapter(fingerprint))
    return api


def call(fn: Any, *args: Any, what: str = "", **kwargs: Any) -> Any:
    """Run one proxmoxer call and type its failure."""
    from proxmoxer.core import ResourceException

    try:
        return fn(*args, **kwargs)
    except ResourceException as exc:
        status = int(exc.status_code)
        detail = redact(f"{exc.status_message}: {exc.content}".strip(": "))
        if exc.errors:
            detail += f" {exc.errors}"
        raise ServiceError(f"proxmox {what}: HTTP {status} {detail}", service="proxmox",
                           status=status, transient=status >= 500 and status != 501) from None
    except requests.exceptions.SSLError as exc:
        raise ServiceError(f"proxmox {what}: TLS verification failed ({exc.__class__.__name__})",
                           service="proxmox", transient=False) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise ServiceError(f"proxmox {what}: {exc.__class__.__name__}: {redact(str(exc))}",
                           service="proxmox", transient=True) from None


def version(api: Any) -> str:
    data = call(api.version.get, what="GET /version")
    return str(data.get("version", "?"))


def node_names(api: Any) -> list[str]:
    data = call(api.nodes.get, what="GET /nodes")
    return sorted(str(n["node"]) for n in data)
