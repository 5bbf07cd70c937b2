"""Inventory section ``path_backups:``: named sets of paths backed up by restic running
on an SSH host, with that host's own credentials. Also their cross-checks: the host
and the repository each names."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import AbsPath, Cron, GuestName, Minutes, Name, Seconds, Secret
from labkeeper.inventory.repositories import Retention, check_repo
from labkeeper.inventory.sites import SiteName
from labkeeper.inventory.xref import CrossCheck, unknown


class HostS3Keys(_Model):
    access_key_id: Secret
    secret_access_key: Secret


class HostCredentials(_Model):
    """What a path set's host receives instead of the repository's own secrets: a
    restic key of its own (``restic key add``: revocable alone with ``restic key
    remove``) and, for an s3: repository, a bucket key of its own (e.g. a B2
    application key without deleteFiles). The controller keeps using the repository's
    credentials for its checks. See docs/ADMIN_GUIDE.md, "Path-backup hosts"."""

    password: Secret
    s3: HostS3Keys | None = None


class PathBackup(_Model):
    """A named set of paths backed up by restic running on ``host`` (issue 11)."""

    name: Name
    host: GuestName
    """A host, or a guest with an ssh section."""
    paths: list[AbsPath] = Field(min_length=1)
    excludes: list[str] = []
    exclude_caches: bool = True
    one_file_system: bool = False
    schedule: Cron = "30 2 * * *"
    repository: Name | None = None
    """Default: the only repository."""
    retention: Retention | None = None
    """Default: the repository's retention."""
    restic_binary: str = "restic"
    sudo: bool | Literal["restic"] = False
    """``true``: ``sudo -n -- sh -c ...`` (sudoers must allow sh, which is root);
    ``restic``: ``sudo -n --preserve-env=<names> -- <restic_binary> ...``, no shell
    under sudo (sudoers allows only restic and keeps those variables)."""
    host_credentials: HostCredentials | None = None
    """Default: the host gets the repository's own password and bucket keys."""
    timeout_minutes: Minutes = 24 * 60
    progress_interval: Seconds = 30
    site: SiteName | None = None
    """The site whose worker runs this set (``settings.sites``)."""


# ---- cross-references ----------------------------------------------------------------


def check_path_backup_names(x: CrossCheck) -> None:
    x.unique("path_backups", x.v.path_backups, "name", "path backup name")


def check_path_backups(x: CrossCheck) -> None:
    for i, pb in x.v.path_backups:
        if pb.host is not None and pb.host not in x.ssh_names:
            x.add(("path_backups", i, "host"),
                  unknown("SSH host", pb.host, x.ssh_names, "hosts or guests with ssh"))
        if "repository" not in x.v.bad_fields(("path_backups", i)):
            check_repo(x, ("path_backups", i, "repository"), pb.repository)
