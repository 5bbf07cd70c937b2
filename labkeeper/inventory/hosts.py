"""Inventory sections ``ssh:`` and ``hosts:``: SSH defaults, plain SSH hosts (a NAS, a
drill server...), and the resolved target every SSH connection is made from."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import (
    AbsPath,
    GuestName,
    HostAddr,
    HostKey,
    Port,
    Seconds,
    Secret,
    Tag,
    UserName,
)
from labkeeper.inventory.xref import CrossCheck


class SshDefaults(_Model):
    """Defaults for every SSH target (hosts and guests with an ``ssh`` section)."""

    user: UserName = "root"
    port: Port = 22
    key: Secret | None = None
    """Private key (ed25519) as a secret reference."""
    known_hosts: AbsPath | None = None
    """Default: ``settings.known_hosts``."""
    trust_on_first_use: bool = False
    connect_timeout: Seconds = 10
    command_timeout: Seconds = 3600


class Host(_Model):
    """An SSH host that is not a Proxmox guest (a NAS, a drill server...)."""

    name: GuestName
    address: HostAddr
    port: Port | None = None
    user: UserName | None = None
    key: Secret | None = None
    host_key: HostKey | None = None
    trust_on_first_use: bool | None = None
    connect_timeout: Seconds | None = None
    description: str = ""
    tags: list[Tag] = []


class SshTargetSpec(_Model):
    """A resolved SSH target: inventory defaults merged with per-target settings."""

    name: str
    kind: Literal["host", "guest"]
    address: str
    port: int
    user: str
    key: str | None
    known_hosts: Path
    trust_on_first_use: bool
    host_key: str | None
    connect_timeout: float
    command_timeout: float
    vmid: int | None = None


# ---- cross-references ----------------------------------------------------------------


def check_host_names(x: CrossCheck) -> None:
    x.unique("hosts", x.v.hosts, "name", "host name")


def check_host_keys(x: CrossCheck) -> None:
    for i, h in x.v.hosts:
        if h.key is None and x.default_key is None:
            x.add(("hosts", i), "no SSH key: set ssh.key (the defaults) or key here")
