"""Where and how to log in: :class:`SshTarget`, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labkeeper.errors import ConfigError
from labkeeper.secrets import check_reference
from labkeeper.ssh.hostkeys import host_key_name, pinned_fingerprint


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
