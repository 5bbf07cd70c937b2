"""The inputs of ``labkeeper init``: what was read from the lab (:class:`ClusterFacts`)
and what the person chose on the command line (:class:`InitOptions`), with the parsing
and checks of those options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from labkeeper import proxmox as px
from labkeeper.errors import ConfigError
from labkeeper.secrets import check_reference


class InitError(ConfigError):
    """``labkeeper init`` cannot write the inventory (bad options, an existing file...)."""


@dataclass(frozen=True)
class StorageFacts:
    name: str
    type: str
    content: tuple[str, ...]
    nodes: tuple[str, ...]
    shared: bool = False


@dataclass(frozen=True)
class GuestFacts:
    resource: px.Guest
    config: Mapping[str, Any]


@dataclass(frozen=True)
class ClusterFacts:
    nodes: tuple[str, ...]
    guests: tuple[GuestFacts, ...]
    storages: tuple[StorageFacts, ...]
    templates: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """Container template volids by node."""
    backup_jobs: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    password: str | None
    """A secret reference, never the password."""


@dataclass(frozen=True)
class InitOptions:
    lab_name: str = "homelab"
    proxmox_host: str | None = None
    proxmox_port: int = 8006
    token_id: str | None = None
    token_secret: str | None = None
    fingerprint: str | None = None
    ca_file: str | None = None
    postgres: PgServer | None = None
    managed_tag: str = "labkeeper"
    repository_url: str | None = None
    repository_password: str = "file:/etc/labkeeper/restic-password"  # noqa: S105 - a reference


def parse_proxmox_url(url: str) -> tuple[str, int]:
    """``https://pve1:8006`` / ``pve1:8006`` / ``pve1`` → (host, port)."""
    parts = urlsplit(url if "://" in url else f"https://{url}")
    if not parts.hostname:
        raise InitError(f"--proxmox: not a host or URL: {url!r}")
    try:
        port = parts.port or 8006
    except ValueError:
        raise InitError(f"--proxmox: bad port in {url!r}") from None
    return parts.hostname, port


def parse_host_port(text: str, default_port: int = 5432) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    if not port.isdigit():
        raise InitError(f"--postgres: expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def check_ref(option: str, ref: str | None) -> str | None:
    """A secret option must be a reference; the message never echoes the value."""
    if ref is None:
        return None
    try:
        return check_reference(ref)
    except ValueError:
        raise InitError(f"{option} must be a secret reference (env:NAME, file:/path or "
                        "prefect-block:NAME), never the secret itself (the value is not "
                        "shown)") from None
