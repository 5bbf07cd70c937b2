"""The source side of an off-site copy: SSH to a Proxmox node and the archive's SHA-256
as ``sha256sum`` computes it there (so the bytes streamed can be checked against it)."""

from __future__ import annotations

import re

from labkeeper.errors import ConfigError, ServiceError
from labkeeper.inventory import Inventory
from labkeeper.ssh import SshClient, SshTarget


def parse_sha256sum(output: str, path: str) -> str:
    """The digest from ``sha256sum -- PATH`` output."""
    m = re.match(r"^\\?([0-9a-f]{64})\s+\*?(.*)$", output.strip())
    if not m:
        raise ServiceError(f"sha256sum of {path}: unexpected output", service="ssh")
    return m.group(1)


def remote_sha256(ssh: SshClient, path: str, *, timeout: float) -> str:
    result = ssh.run(("sha256sum", "--", path), timeout=timeout)
    return parse_sha256sum(result.stdout, path)


def node_ssh_target(inv: Inventory, node: str) -> SshTarget:
    """SSH to a Proxmox node: the node's ``address``/``ssh_user`` with the inventory's
    SSH defaults (key, port, known_hosts)."""
    n = inv.node(node)
    if n.address is None:
        raise ConfigError(f"node {node}: no address for SSH (needed for off-site copies)")
    d = inv.ssh
    if d.key is None:
        raise ConfigError("ssh.key is not set (needed to read archives from the nodes)")
    return SshTarget(name=node, host=str(n.address), key=str(d.key),
                     known_hosts=inv.known_hosts_path(), port=d.port, user=n.ssh_user,
                     trust_on_first_use=d.trust_on_first_use,
                     connect_timeout=float(d.connect_timeout))
