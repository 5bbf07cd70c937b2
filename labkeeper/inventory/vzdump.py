"""Inventory section ``vzdump_jobs:``: Proxmox backup jobs (which guests, where,
retention, off-site copies, schedule).

Also their cross-checks: the storage, the guests and vmids selected, the node, the
off-site repository or SSH host.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from labkeeper.inventory.base import _exactly_one, _Model
from labkeeper.inventory.fields import (
    VMID,
    AbsPath,
    Cron,
    GuestName,
    Minutes,
    Name,
    NodeName,
    NonNegInt,
    PoolName,
    PositiveInt,
    StorageName,
    Tag,
    _int_to_str,
)
from labkeeper.inventory.proxmox import check_storage
from labkeeper.inventory.repositories import check_repo
from labkeeper.inventory.sites import SiteName
from labkeeper.inventory.xref import CrossCheck, unknown


class Selection(_Model):
    """Which guests a job covers, resolved at run time against /cluster/resources:
    (vmids + guests + tags + pool, or all), limited to ``node``, minus the excludes."""

    all: bool = False
    vmids: list[VMID] = []
    guests: list[GuestName] = []
    tags: list[Tag] = []
    pool: PoolName | None = None
    node: NodeName | None = None
    exclude: list[VMID] = []
    exclude_tags: list[Tag] = []

    @model_validator(mode="after")
    def _something(self) -> Selection:
        picked = bool(self.vmids or self.guests or self.tags or self.pool)
        if self.all and picked:
            raise ValueError("all: true already selects every guest; drop vmids/guests/tags/pool")
        if not self.all and not picked and self.node is None:
            raise ValueError("select something: all, vmids, guests, tags, pool or node")
        both = set(self.vmids) & set(self.exclude)
        if both:
            raise ValueError(f"vmids both selected and excluded: {sorted(both)}")
        return self


class PruneRetention(_Model):
    """Proxmox prune-backups policy, per guest."""

    keep_all: bool = False
    keep_last: NonNegInt | None = None
    keep_hourly: NonNegInt | None = None
    keep_daily: NonNegInt | None = None
    keep_weekly: NonNegInt | None = None
    keep_monthly: NonNegInt | None = None
    keep_yearly: NonNegInt | None = None

    @model_validator(mode="after")
    def _keeps(self) -> PruneRetention:
        keeps = [k for k in type(self).model_fields if k != "keep_all" and getattr(self, k)]
        if self.keep_all and keeps:
            raise ValueError("keep_all excludes the other keep_* options")
        if not self.keep_all and not keeps:
            raise ValueError("a retention policy must keep something (or keep_all: true)")
        return self

    def as_pve(self) -> str:
        """The ``prune-backups`` property string: ``keep-daily=7,keep-weekly=4``."""
        if self.keep_all:
            return "keep-all=1"
        return ",".join(
            f"{k.replace('_', '-')}={getattr(self, k)}"
            for k in type(self).model_fields
            if k != "keep_all" and getattr(self, k)
        )


class Offsite(_Model):
    """Copy new archives off-site: to a repository's S3 bucket (streamed from the
    node over SFTP into a multipart upload) or to a path on an SSH host."""

    repository: Name | None = None
    """A repository with an ``s3`` section: copies go to its bucket."""
    host: GuestName | None = None
    """An SSH host (from ``hosts``, or a guest with ``ssh``) that only needs SFTP;
    copies go to ``path`` on it."""
    path: AbsPath | None = None
    """Directory on ``host``: each guest's copies in ``<path>/<vmid>/``, each with a
    ``<archive>.sha256`` sidecar (``sha256sum -c`` format)."""
    prefix: str = "vzdump/"
    """Object key prefix in the bucket (repository target)."""
    keep_last: PositiveInt = 2
    max_age_days: PositiveInt | None = None

    @model_validator(mode="after")
    def _target(self) -> Offsite:
        _exactly_one(self, ("repository", "host"), "offsite target")
        if self.host is not None and self.path is None:
            raise ValueError("an offsite host needs a path")
        if self.repository is not None and self.path is not None:
            raise ValueError("path is for an offsite host; use prefix for a repository")
        if self.host is not None and "prefix" in self.model_fields_set:
            raise ValueError("prefix is for a repository; an offsite host uses path")
        return self


_NOTES_VARS = frozenset({"cluster", "guestname", "node", "vmid"})


def _check_notes(value: str) -> str:
    for var in re.findall(r"\{\{\s*([^}]*?)\s*\}\}", value):
        if var not in _NOTES_VARS:
            raise ValueError(
                f"unknown notes variable {{{{{var}}}}}; use {{{{cluster}}}}, "
                "{{guestname}}, {{node}} or {{vmid}}"
            )
    return value


class VzdumpJob(_Model):
    name: Name
    selection: Selection
    storage: StorageName
    mode: Literal["snapshot", "suspend", "stop"] = "snapshot"
    compress: Annotated[Literal["zstd", "gzip", "lzo", "0"], BeforeValidator(_int_to_str)] = "zstd"
    retention: PruneRetention
    offsite: Offsite | None = None
    schedule: Cron
    max_per_node: Annotated[int, Field(ge=1, le=16)] = 1
    notes_template: Annotated[str, AfterValidator(_check_notes)] = "{{guestname}}"
    timeout_minutes: Minutes = 180
    min_size_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5
    """A new archive smaller than this fraction of the previous one fails verification."""
    native: bool = False
    """Also mirror as a Proxmox /cluster/backup job (``labkeeper vzdump sync-jobs``)."""
    enabled: bool = True
    site: SiteName | None = None
    """The site whose worker runs this job (``settings.sites``)."""


# ---- cross-references ----------------------------------------------------------------


def check_vzdump_job_names(x: CrossCheck) -> None:
    x.unique("vzdump_jobs", x.v.vzdump_jobs, "name", "vzdump job name")


def check_vzdump_jobs(x: CrossCheck) -> None:
    for i, job in x.v.vzdump_jobs:
        sel = job.selection
        check_storage(x, ("vzdump_jobs", i, "storage"), job.storage,
                      sel.node if sel is not None else None, "backup", "vzdump archives")
        if sel is not None:
            _check_selection(x, i, sel)
        if job.offsite is not None:
            _check_offsite(x, i, job.offsite)


def _check_selection(x: CrossCheck, i: int, sel: Selection) -> None:
    known = x.known
    for key in ("vmids", "exclude"):
        for n, vmid in enumerate(getattr(sel, key) or ()):
            if vmid not in known["vmid"]:
                x.add(("vzdump_jobs", i, "selection", key, n),
                      f"vmid {vmid} is not a guest in the inventory")
    for n, name in enumerate(sel.guests or ()):
        if name not in known["guest"]:
            x.add(("vzdump_jobs", i, "selection", "guests", n),
                  unknown("guest", name, known["guest"]))
    if sel.node is not None and sel.node not in known["node"]:
        x.add(("vzdump_jobs", i, "selection", "node"), unknown("node", sel.node, known["node"]))


def _check_offsite(x: CrossCheck, i: int, off: Offsite) -> None:
    if off.repository is not None:
        check_repo(x, ("vzdump_jobs", i, "offsite", "repository"), off.repository,
                   need_s3=True)
    if off.host is not None and off.host not in x.ssh_names:
        x.add(("vzdump_jobs", i, "offsite", "host"),
              unknown("SSH host", off.host, x.ssh_names, "hosts or guests with ssh"))
