"""Backblaze B2 (or any S3 API) through boto3: bucket checks and usage.

TLS is verified (the system CA bundle, or ``ca_file``); plain ``http://``
endpoints are accepted only for loopback addresses (the local lab's S3 server).
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from pydantic import SecretStr

from labkeeper.errors import ConfigError, ServiceError

_TRANSIENT_CODES = {"500", "502", "503", "504", "RequestTimeout", "SlowDown",
                    "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed"}


@dataclass(frozen=True)
class S3Target:
    endpoint: str
    bucket: str
    region: str | None
    """None: boto3's default (AWS_DEFAULT_REGION or its config)."""
    access_key_id: SecretStr
    secret_access_key: SecretStr
    ca_file: str | None = None


def check_endpoint(endpoint: str) -> None:
    """Refuse unencrypted endpoints except on loopback."""
    u = urlparse(endpoint)
    if u.scheme == "https":
        return
    if u.scheme == "http":
        host = u.hostname or ""
        try:
            if host == "localhost" or ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            pass
        raise ConfigError(f"s3.endpoint {endpoint}: plain http is allowed only on loopback; "
                          "use https")
    raise ConfigError(f"s3.endpoint {endpoint}: must be an https:// URL")


def client(target: S3Target, *, timeout: float = 20) -> Any:
    import boto3
    from botocore.config import Config

    check_endpoint(target.endpoint)
    cfg = Config(connect_timeout=timeout, read_timeout=timeout,
                 retries={"max_attempts": 1, "mode": "standard"},
                 signature_version="s3v4", s3={"addressing_style": "path"})
    return boto3.client(
        "s3",
        endpoint_url=target.endpoint,
        region_name=target.region,
        aws_access_key_id=target.access_key_id.get_secret_value(),
        aws_secret_access_key=target.secret_access_key.get_secret_value(),
        verify=target.ca_file or True,
        config=cfg,
    )


def _service_error(exc: Exception, what: str) -> ServiceError:
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return ServiceError(f"s3 {what}: {code or status}", service="s3", status=status,
                            transient=code in _TRANSIENT_CODES or (status or 0) >= 500)
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError
                  | ConnectionClosedError):
        return ServiceError(f"s3 {what}: {exc}", service="s3", transient=True)
    return ServiceError(f"s3 {what}: {exc}", service="s3", transient=False)


def head_bucket(target: S3Target, *, timeout: float = 20) -> float:
    """Check the bucket exists and the key may use it; returns latency in seconds."""
    started = time.monotonic()
    try:
        client(target, timeout=timeout).head_bucket(Bucket=target.bucket)
    except ConfigError:
        raise
    except Exception as exc:
        raise _service_error(exc, f"head_bucket {target.bucket}") from None
    return time.monotonic() - started


def create_bucket(target: S3Target, *, timeout: float = 20) -> None:
    try:
        client(target, timeout=timeout).create_bucket(Bucket=target.bucket)
    except Exception as exc:
        raise _service_error(exc, f"create_bucket {target.bucket}") from None


def bucket_usage(target: S3Target, *, prefix: str = "", timeout: float = 60) -> tuple[int, int]:
    """(object count, total bytes) under a prefix."""
    count = size = 0
    try:
        pages = client(target, timeout=timeout).get_paginator("list_objects_v2").paginate(
            Bucket=target.bucket, Prefix=prefix)
        for page in pages:
            for obj in page.get("Contents", []):
                count += 1
                size += int(obj["Size"])
    except Exception as exc:
        raise _service_error(exc, f"list {target.bucket}") from None
    return count, size


# -- usage, cost and protection (issue 4) ---------------------------------------------

@dataclass(frozen=True)
class BucketUsage:
    bucket: str
    prefix: str
    objects: int
    bytes: int
    monthly_cost: float
    currency: str
    versioning: str
    """``Enabled`` | ``Suspended`` | ``Off`` (never enabled)."""
    object_lock: str
    """``Enabled (GOVERNANCE 30 days)`` | ``Enabled`` | ``Off``."""

    def row(self) -> dict[str, Any]:
        return {"bucket": self.bucket, "prefix": self.prefix, "objects": self.objects,
                "bytes": self.bytes, "GB": round(self.bytes / 1e9, 3),
                "monthly cost": f"{self.monthly_cost:.2f} {self.currency}",
                "versioning": self.versioning, "object lock": self.object_lock}


def monthly_cost(nbytes: int, storage_per_tb_month: float) -> float:
    """Storage cost per month (B2 bills per TB = 10^12 bytes)."""
    return nbytes / 1e12 * storage_per_tb_month


def versioning_status(target: S3Target, *, timeout: float = 20) -> str:
    try:
        resp = client(target, timeout=timeout).get_bucket_versioning(Bucket=target.bucket)
    except Exception as exc:
        raise _service_error(exc, f"get_bucket_versioning {target.bucket}") from None
    return str(resp.get("Status") or "Off")


def object_lock_status(target: S3Target, *, timeout: float = 20) -> str:
    from botocore.exceptions import ClientError

    try:
        resp = client(target, timeout=timeout).get_object_lock_configuration(
            Bucket=target.bucket)
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("ObjectLockConfigurationNotFoundError", "NoSuchObjectLockConfiguration"):
            return "Off"
        raise _service_error(exc, f"get_object_lock_configuration {target.bucket}") from None
    except Exception as exc:
        raise _service_error(exc, f"get_object_lock_configuration {target.bucket}") from None
    cfg = resp.get("ObjectLockConfiguration", {})
    if cfg.get("ObjectLockEnabled") != "Enabled":
        return "Off"
    rule = cfg.get("Rule", {}).get("DefaultRetention", {})
    if rule:
        period = (f"{rule['Days']} days" if "Days" in rule else f"{rule.get('Years')} years")
        return f"Enabled ({rule.get('Mode', '?')} {period})"
    return "Enabled"


def usage(target: S3Target, *, prefix: str = "", storage_per_tb_month: float = 6.0,
          currency: str = "USD", timeout: float = 60) -> BucketUsage:
    """Object count and bytes under ``prefix``, a monthly storage cost estimate, and
    whether versioning / object lock protect the bucket."""
    count, size = bucket_usage(target, prefix=prefix, timeout=timeout)
    return BucketUsage(bucket=target.bucket, prefix=prefix, objects=count, bytes=size,
                       monthly_cost=monthly_cost(size, storage_per_tb_month),
                       currency=currency, versioning=versioning_status(target, timeout=timeout),
                       object_lock=object_lock_status(target, timeout=timeout))


def repository_prefix(restic_url: str, bucket: str) -> str:
    """The object prefix of an ``s3:`` restic repository inside its bucket."""
    rest = restic_url[3:] if restic_url.startswith("s3:") else restic_url
    if "://" in rest:
        rest = rest.split("://", 1)[1]
    parts = rest.split("/")
    if bucket in parts:
        tail = "/".join(parts[parts.index(bucket) + 1:]).strip("/")
        return f"{tail}/" if tail else ""
    return ""
