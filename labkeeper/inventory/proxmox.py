"""Inventory section ``proxmox:``: the API connection, its nodes and storages.

Also the checks of references into it: storages named by guests, drills, vzdump jobs
and apps must exist, hold the content asked of them and be on the node that uses them.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import (
    AbsPath,
    Fingerprint,
    HostAddr,
    NodeName,
    Port,
    Seconds,
    Secret,
    StorageName,
    UserName,
)
from labkeeper.inventory.xref import CrossCheck, Loc, unknown

_TOKEN_ID = re.compile(r"[^\s:/@!=]+@[A-Za-z][A-Za-z0-9._-]*![A-Za-z][A-Za-z0-9._-]*")


def _check_token_id(value: str) -> str:
    if not _TOKEN_ID.fullmatch(value):
        raise ValueError(
            "must be a Proxmox API token id USER@REALM!TOKENNAME (the secret goes in "
            "token_secret as a reference)"
        )
    return value


TokenId = Annotated[str, AfterValidator(_check_token_id)]


class Tls(_Model):
    """TLS for the Proxmox API: verified against the system CAs or ``ca_file``,
    or pinned to a SHA-256 certificate fingerprint. ``verify: false`` is accepted
    only together with a pinned fingerprint."""

    verify: bool = True
    ca_file: AbsPath | None = None
    fingerprint: Fingerprint | None = None

    @model_validator(mode="after")
    def _safe(self) -> Tls:
        if not self.verify and self.fingerprint is None:
            raise ValueError(
                "verify: false needs a pinned fingerprint (never an unverified connection)"
            )
        if not self.verify and self.ca_file is not None:
            raise ValueError("ca_file has no effect with verify: false")
        return self


class Node(_Model):
    name: NodeName
    address: HostAddr | None = None
    """Address for SSH/SFTP to the node (off-site copies stream archives from it)."""
    ssh_user: UserName = "root"


StorageType = Literal[
    "dir", "lvmthin", "lvm", "zfspool", "nfs", "cifs", "pbs", "cephfs", "rbd", "btrfs",
    "glusterfs", "iscsi", "zfs",
]
StorageContent = Literal["images", "rootdir", "vztmpl", "backup", "iso", "snippets", "import"]
_SNAPSHOT_TYPES = frozenset({"lvmthin", "zfspool", "rbd", "btrfs", "zfs"})


class Storage(_Model):
    name: StorageName
    type: StorageType
    content: list[StorageContent] = Field(min_length=1)
    snapshots: bool | None = None
    """Whether guest disks here support snapshots; default from the type
    (lvmthin, zfspool, rbd, btrfs: yes)."""
    shared: bool = False
    nodes: list[NodeName] = []
    """Nodes that have this storage; empty means every node."""

    @property
    def supports_snapshots(self) -> bool:
        return self.snapshots if self.snapshots is not None else self.type in _SNAPSHOT_TYPES

    def available_on(self, node: str) -> bool:
        return not self.nodes or node in self.nodes


class Proxmox(_Model):
    host: HostAddr
    port: Port = 8006
    token_id: TokenId
    token_secret: Secret
    tls: Tls = Tls()
    timeout: Seconds = 30
    """Seconds per API request."""
    task_timeout: Seconds = 3600
    """Default seconds to wait for a task (UPID) to finish."""
    nodes: list[Node] = Field(min_length=1)
    storages: list[Storage] = []


# ---- cross-references ----------------------------------------------------------------


def check_proxmox_names(x: CrossCheck) -> None:
    x.unique("storages", x.v.storages, "name", "storage name", ("proxmox",))
    if x.v.proxmox is not None and x.v.proxmox.nodes:
        x.unique("nodes", list(enumerate(x.v.proxmox.nodes)), "name", "node name",
                 ("proxmox",))


def check_storage_nodes(x: CrossCheck) -> None:
    known = x.known
    for i, s in x.v.storages:
        for n, node in enumerate(s.nodes or ()):
            if node not in known["node"]:
                x.add(("proxmox", "storages", i, "nodes", n),
                      unknown("node", node, known["node"], "proxmox.nodes"))


def check_storage(x: CrossCheck, loc: Loc, name: str | None, node: str | None,
                  content: str, why: str) -> None:
    """A storage named at ``loc``: declared, on ``node`` and able to hold ``content``."""
    known = x.known
    if name is None:
        return
    if name not in known["storage"]:
        x.add(loc, unknown("storage", name, known["storage"], "proxmox.storages"))
        return
    s = x.storages.get(name)
    if s is None or s.content is None:
        return  # declared but invalid: reported by the schema
    if node is not None and node in known["node"] and not s.available_on(node):
        x.add(loc, f"storage {name!r} is not available on node {node!r} "
                   f"(it is on: {', '.join(s.nodes)})")
    if content not in s.content:
        x.add(loc, f"storage {name!r} cannot hold {why} (its content lacks {content!r})")
