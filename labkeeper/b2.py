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
    region: str
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
