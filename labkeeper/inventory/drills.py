"""Inventory section ``drills:``: the servers database drills restore into, and the
settings of guest, repository and path-set drills.

Also their cross-checks: drill servers' guests, the scratch VMID range (no inventory
guest inside it), the restore node and storage, the repositories drilled.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from labkeeper.inventory.base import _Model
from labkeeper.inventory.databases import DatabaseContainer, SslMode
from labkeeper.inventory.fields import (
    VMID,
    BridgeName,
    Cron,
    GuestName,
    HostAddr,
    Hours,
    Name,
    NodeName,
    PgIdent,
    Port,
    PositiveInt,
    Seconds,
    Secret,
    StorageName,
)
from labkeeper.inventory.guests import check_guest_ref
from labkeeper.inventory.proxmox import check_storage
from labkeeper.inventory.xref import CrossCheck, unknown


class DrillServer(_Model):
    """A PostgreSQL server where database drills restore into scratch databases
    named ``labkeeper_drill_*`` (never colliding with a real database)."""

    name: Name
    host: HostAddr | None = None
    guest: GuestName | None = None
    """Neither host nor guest: libpq defaults of the worker (PGHOST, unix socket)."""
    container: DatabaseContainer | None = None
    """The drill server runs in this container on ``host``/``guest`` (as for
    :attr:`Database.container`)."""
    port: Port = 5432
    user: PgIdent = "postgres"
    password: Secret | None = None
    sslmode: SslMode = "prefer"
    maintenance_db: PgIdent = "postgres"

    @model_validator(mode="after")
    def _where(self) -> DrillServer:
        if self.host is not None and self.guest is not None:
            raise ValueError("set host or guest, not both")
        if self.container is not None and self.host is None and self.guest is None:
            raise ValueError("container needs host or guest (where docker runs)")
        return self


class VmidRange(_Model):
    first: VMID
    last: VMID

    @model_validator(mode="after")
    def _order(self) -> VmidRange:
        if self.first > self.last:
            raise ValueError("first must be ≤ last")
        return self

    def __contains__(self, vmid: object) -> bool:
        return isinstance(vmid, int) and self.first <= vmid <= self.last


class GuestDrillSettings(_Model):
    scratch_vmids: VmidRange = VmidRange(first=9900, last=9999)
    """Restored guests get a VMID from this range; it may hold no inventory guest."""
    bridge: BridgeName | None = None
    """Isolated bridge for restored guests; None detaches their network."""
    storage: StorageName | None = None
    """Where to restore; default: the guest's own storage."""
    node: NodeName | None = None
    """Node to restore on; default: the guest's node."""
    boot_timeout: Seconds = 300
    keep_on_failure: bool = False
    """Keep a failed drill's copy for inspection (tagged ``labkeeper-drill-kept``;
    never swept, reported by every guest drill until you destroy it)."""
    stale_scratch_hours: Hours = 6
    """Scratch copies are tagged ``labkeeper-drill`` and marked in their
    description when restored. A guest drill first destroys marked copies in
    ``scratch_vmids`` older than this (left by a drill that died); younger ones
    may belong to a drill still running. Unmarked guests are never touched."""


class RepositoryDrillSettings(_Model):
    enabled: bool = True
    schedule: Cron | None = None
    read_data_period: PositiveInt = 12
    """The whole repository is read over this many drills (``--read-data-subset n/N``)."""
    restore_random_snapshot: bool = True
    repositories: list[Name] = []
    """Empty: every repository."""


class PathDrillSettings(_Model):
    """Path-set drills (target ``paths:<host>/<set>``): a random sample of files of
    the set's latest snapshot is restored (``restic dump``) and its SHA-256
    compared with the file on the host (``sha256sum`` over SSH). A file changed
    since the backup (size or mtime not as restic recorded it, or mtime newer
    than the snapshot) or deleted is reported, not failed; a different content
    in an unchanged file fails the drill."""

    enabled: bool = True
    """Include every path set (or ``path_sets``) in ``all``."""
    schedule: Cron | None = None
    """Default: ``drills.schedule``."""
    sample_files: PositiveInt = 20
    """Files compared per path set (all of them when the snapshot has fewer)."""
    max_file_mb: Annotated[float, Field(gt=0)] = 1024
    """Larger files are left out of the sample (their count is reported)."""
    rpo_hours: Hours = 26
    """Objective for the age of the latest snapshot."""
    path_sets: list[Name] = []
    """Empty: every path set."""


class Drills(_Model):
    schedule: Cron = "0 5 * * 0"
    """Default schedule of every drill."""
    servers: list[DrillServer] = []
    guests: GuestDrillSettings = GuestDrillSettings()
    repository: RepositoryDrillSettings = RepositoryDrillSettings()
    paths: PathDrillSettings = PathDrillSettings()


# ---- cross-references ----------------------------------------------------------------


def check_drill_server_names(x: CrossCheck) -> None:
    if x.v.drills is not None and x.v.drills.servers:
        x.unique("servers", list(enumerate(x.v.drills.servers)), "name", "drill server name",
                 ("drills",))


def check_drills(x: CrossCheck) -> None:
    drills = x.v.drills
    if drills is None:
        return
    for i, s in enumerate(drills.servers or ()):
        check_guest_ref(x, ("drills", "servers", i, "guest"), s.guest, "address")
    gd = drills.guests
    if gd is not None:
        _check_scratch_vmids(x, gd.scratch_vmids)
        if gd.node is not None and gd.node not in x.known["node"]:
            x.add(("drills", "guests", "node"), unknown("node", gd.node, x.known["node"]))
        check_storage(x, ("drills", "guests", "storage"), gd.storage, gd.node, "images",
                      "restored guests")
    repo_drill = drills.repository
    for r, name in enumerate(repo_drill.repositories or () if repo_drill else ()):
        if name not in x.known["repository"]:
            x.add(("drills", "repository", "repositories", r),
                  unknown("repository", name, x.known["repository"]))


def _check_scratch_vmids(x: CrossCheck, rng: VmidRange | None) -> None:
    if rng is None or rng.first is None or rng.last is None:
        return
    for i, g in x.v.guests:
        if g.vmid is not None and g.vmid in rng:
            x.add(("guests", i, "vmid"),
                  f"vmid {g.vmid} is inside drills.guests.scratch_vmids "
                  f"({rng.first}-{rng.last}), where drills restore scratch guests")
