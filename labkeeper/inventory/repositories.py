"""Inventory section ``repositories:``: restic repositories (where, credentials,
retention, checks, pricing of the cost estimate).

Also the check other sections use when they name a repository (or rely on the only
one).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import AbsPath, Cron, HttpUrl, Minutes, Name, NonNegInt, Secret
from labkeeper.inventory.xref import CrossCheck, Loc, unknown

_RESTIC_SCHEMES = ("s3", "b2", "sftp", "rest", "swift", "azure", "gs", "rclone", "local")


def _check_restic_url(value: str) -> str:
    if value.startswith("/"):
        return value
    scheme, colon, rest = value.partition(":")
    if not colon or scheme not in _RESTIC_SCHEMES or not rest:
        raise ValueError(
            "must be a restic repository: s3:https://host/bucket/path, b2:bucket:path, "
            "sftp:user@host:/path, rest:https://..., rclone:remote:path or an absolute path"
        )
    return value


def _check_bucket(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
        raise ValueError("must be an S3 bucket name (3-63 lowercase letters, digits, '-', '.')")
    return value


class S3(_Model):
    """S3 API (Backblaze B2 or another) for restic and for boto3."""

    endpoint: HttpUrl
    bucket: Annotated[str, AfterValidator(_check_bucket)]
    region: str | None = None
    access_key_id: Secret
    secret_access_key: Secret
    ca_file: AbsPath | None = None


def _check_restic_duration(value: str) -> str:
    if not re.fullmatch(r"(\d+[yYmdhH])+", value):
        raise ValueError("must be a restic duration like 2y5m7d3h")
    return value


class Retention(_Model):
    """restic forget policy (per backup series)."""

    keep_last: NonNegInt | None = None
    keep_hourly: NonNegInt | None = None
    keep_daily: NonNegInt | None = None
    keep_weekly: NonNegInt | None = None
    keep_monthly: NonNegInt | None = None
    keep_yearly: NonNegInt | None = None
    keep_within: Annotated[str, AfterValidator(_check_restic_duration)] | None = None

    @model_validator(mode="after")
    def _keeps(self) -> Retention:
        if not any(getattr(self, k) for k in type(self).model_fields):
            raise ValueError("a retention policy must keep something (every keep_* is 0/unset)")
        return self

    def restic_args(self) -> tuple[str, ...]:
        """``("--keep-last", "3", ...)`` for ``restic forget``."""
        args: list[str] = []
        for key in type(self).model_fields:
            value = getattr(self, key)
            if value:
                args += [f"--{key.replace('_', '-')}", str(value)]
        return tuple(args)


def _check_subset(value: str) -> str:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if m and 0 < float(m.group(1)) <= 100:
        return value
    m = re.fullmatch(r"(\d+)/(\d+)", value)
    if m and 1 <= int(m.group(1)) <= int(m.group(2)):
        return value
    if re.fullmatch(r"\d+[KMGT]", value):
        return value
    raise ValueError("must be a percentage (5%), a fraction n/N or a size (500M)")


class CheckPolicy(_Model):
    """restic check, run by repo maintenance."""

    schedule: Cron = "0 4 * * 0"
    read_data_subset: Annotated[str, AfterValidator(_check_subset)] | None = "5%"


class Pricing(_Model):
    """Prices for the monthly cost estimate (B2 defaults, USD)."""

    storage_per_tb_month: Annotated[float, Field(ge=0)] = 6.0
    download_per_tb: Annotated[float, Field(ge=0)] = 10.0
    currency: str = "USD"


class Repository(_Model):
    name: Name
    url: Annotated[str, AfterValidator(_check_restic_url)]
    """Where the restic repository is: an absolute local path (``/srv/backup/restic``,
    a disk or NAS mount; run ``restic init`` there once; no credentials besides the
    password), ``s3:https://host/bucket/path`` (needs the ``s3`` section),
    ``b2:bucket:path``, ``sftp:user@host:/path``, ``rest:https://...`` or
    ``rclone:remote:path``."""
    password: Secret
    s3: S3 | None = None
    retention: Retention = Retention(keep_daily=7, keep_weekly=4, keep_monthly=12)
    check: CheckPolicy = CheckPolicy()
    maintenance_schedule: Cron = "0 3 * * 0"
    """forget + prune schedule."""
    compression: Literal["auto", "off", "max"] = "auto"
    cache_dir: AbsPath | None = None
    """Default: ``settings.cache_dir/<name>``."""
    lock_wait_minutes: Minutes = 30
    stale_lock_minutes: Minutes = 120
    pricing: Pricing = Pricing()

    @model_validator(mode="after")
    def _s3(self) -> Repository:
        if self.url.startswith("s3:"):
            if self.s3 is None:
                raise ValueError("an s3: repository needs an s3 section with the credentials")
            rest = self.url[3:]
            if "://" in rest:
                rest = rest.split("://", 1)[1]
            segments = rest.split("/")
            if len(segments) < 2 or segments[1] != self.s3.bucket:
                raise ValueError("the url's bucket is not s3.bucket")
        return self


# ---- cross-references ----------------------------------------------------------------


def check_repository_names(x: CrossCheck) -> None:
    x.unique("repositories", x.v.repositories, "name", "repository name")


def check_repo(x: CrossCheck, loc: Loc, name: str | None, need_s3: bool = False) -> None:
    """A repository named at ``loc`` (None: the only one) exists, with an s3 section
    when ``need_s3``."""
    known = x.known["repository"]
    if name is None:
        if len(known) != 1:
            x.add(loc, "repository is required: the inventory declares "
                       f"{len(known)} repositories, not exactly one")
        return
    if name not in known:
        x.add(loc, unknown("repository", name, known, "repositories"))
        return
    if need_s3:
        for _, r in x.v.repositories:
            if r.name == name and r.url is not None and r.s3 is None:
                x.add(loc, f"repository {name!r} has no s3 section (off-site copies "
                           "go to its S3 bucket)")
