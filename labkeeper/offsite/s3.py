"""Off-site copies into S3 (Backblaze B2's S3 API, or any S3): SFTP from the node straight
into a multipart upload, no local temporary file.

The object appears only on ``CompleteMultipartUpload``, so a copy that dies half-way
leaves at most an incomplete upload, which the next attempt for the same key aborts
first. The archive's size and SHA-256 are stored as object metadata; the bytes streamed
must match them before the upload is completed, each part is sent with its Content-MD5,
and the object is read back (length, metadata, multipart ETag) afterwards. Keys are
``<prefix><vmid>/<archive file name>``, so a rerun skips what is there and verified.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import math
import posixpath
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from labkeeper import b2
from labkeeper.errors import ConfigError, LabkeeperError, PermanentError, ServiceError
from labkeeper.inventory import Inventory, Offsite
from labkeeper.offsite.copies import (
    META_CTIME,
    META_SHA256,
    META_SIZE,
    META_VMID,
    META_VOLID,
    CopyResult,
    OffsiteMismatch,
    RemoteObject,
    is_verified,
    retention_plan,
)
from labkeeper.offsite.node import remote_sha256
from labkeeper.secrets import redact, resolve
from labkeeper.ssh import SshClient

log = logging.getLogger("labkeeper.offsite")
MiB = 1024 * 1024
MIN_PART = 8 * MiB
MAX_PARTS = 9000
_TRANSIENT_CODES = {"500", "502", "503", "504", "RequestTimeout", "SlowDown", "InternalError",
                    "ServiceUnavailable", "RequestTimeTooSkewed"}


def object_key(prefix: str, vmid: int, volid_or_name: str) -> str:
    name = posixpath.basename(volid_or_name.partition(":")[2] or volid_or_name)
    return f"{prefix}{vmid}/{name}"


def part_size(size: int) -> int:
    """A part size (MiB multiple, ≥ 8 MiB) keeping the part count under the S3 limit."""
    need = math.ceil(max(size, 1) / MAX_PARTS)
    return max(MIN_PART, math.ceil(need / MiB) * MiB)


def multipart_etag(part_md5s: Iterable[bytes]) -> str:
    """The ETag S3 gives a multipart object: ``md5(concat(part md5s))-N``."""
    digests = list(part_md5s)
    return f"{hashlib.md5(b''.join(digests)).hexdigest()}-{len(digests)}"  # noqa: S324


def _s3_error(exc: Exception, what: str) -> ServiceError:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return ServiceError(f"s3 {what}: {code or status}", service="s3", status=status,
                            transient=code in _TRANSIENT_CODES or (status or 0) >= 500)
    if isinstance(exc, BotoCoreError | OSError):  # connection refused/reset, timeouts
        return ServiceError(f"s3 {what}: {type(exc).__name__}: {redact(str(exc))}",
                            service="s3", transient=True)
    return ServiceError(f"s3 {what}: {type(exc).__name__}: {redact(str(exc))}", service="s3",
                        transient=False)


def s3_call(fn: Callable[..., Any], what: str, **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:
        raise _s3_error(exc, what) from None


def target_for(inv: Inventory, offsite: Offsite) -> b2.S3Target:
    """The S3 bucket of an off-site section with a ``repository``."""
    if offsite.repository is None:
        raise ConfigError("this offsite section copies to an SSH host, not to a bucket")
    repo = inv.repository(offsite.repository)
    if repo.s3 is None:
        raise ConfigError(f"repository {repo.name} has no s3 section")
    return b2.S3Target(endpoint=str(repo.s3.endpoint).rstrip("/"), bucket=repo.s3.bucket,
                       region=repo.s3.region or "us-east-1",
                       access_key_id=resolve(repo.s3.access_key_id),
                       secret_access_key=resolve(repo.s3.secret_access_key),
                       ca_file=str(repo.s3.ca_file) if repo.s3.ca_file else None)


def head(s3: Any, bucket: str, key: str) -> RemoteObject | None:
    from botocore.exceptions import ClientError

    try:
        r = s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 404 or exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey"):
            return None
        raise _s3_error(exc, f"head {key}") from None
    except Exception as exc:
        raise _s3_error(exc, f"head {key}") from None
    return RemoteObject(key, int(r["ContentLength"]), r["LastModified"].timestamp(),
                        {k.lower(): v for k, v in (r.get("Metadata") or {}).items()},
                        str(r.get("ETag", "")).strip('"'))


def list_objects(s3: Any, bucket: str, prefix: str) -> list[RemoteObject]:
    """Objects under ``prefix`` with their metadata (one HEAD each)."""
    keys: list[str] = []
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if token:
            kwargs["ContinuationToken"] = token
        page = s3_call(s3.list_objects_v2, f"list {prefix}", **kwargs)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            break
        token = page.get("NextContinuationToken")
    return [o for k in keys if (o := head(s3, bucket, k)) is not None]


def incomplete_uploads(s3: Any, bucket: str, prefix: str) -> list[tuple[str, str]]:
    """(key, upload id) of multipart uploads started under ``prefix`` and not finished."""
    page = s3_call(s3.list_multipart_uploads, f"list uploads {prefix}", Bucket=bucket,
                   Prefix=prefix)
    return [(u["Key"], u["UploadId"]) for u in page.get("Uploads", []) or []]


def abort_stale_uploads(s3: Any, bucket: str, prefix: str) -> int:
    """Abort unfinished multipart uploads under ``prefix`` (left by a crashed copy)."""
    n = 0
    for key, upload_id in incomplete_uploads(s3, bucket, prefix):
        s3_call(s3.abort_multipart_upload, f"abort {key}", Bucket=bucket, Key=key,
                UploadId=upload_id)
        n += 1
    return n


class _Uploader:
    """Collects streamed bytes into parts and uploads each (called by SFTP reads)."""

    def __init__(self, s3: Any, bucket: str, key: str, upload_id: str, part: int,
                 on_part: Callable[[int, int], None] | None) -> None:
        self.s3, self.bucket, self.key, self.upload_id = s3, bucket, key, upload_id
        self.part_size = part
        self.buf = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.md5s: list[bytes] = []
        self.sha = hashlib.sha256()
        self.total = 0
        self.on_part = on_part

    def write(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.total += len(chunk)
        self.buf += chunk
        while len(self.buf) >= self.part_size:
            data = bytes(self.buf[:self.part_size])
            del self.buf[:self.part_size]
            self._send(data)

    def finish(self) -> None:
        if self.buf or not self.parts:
            self._send(bytes(self.buf))
            self.buf.clear()

    def _send(self, data: bytes) -> None:
        number = len(self.parts) + 1
        md5 = hashlib.md5(data).digest()  # noqa: S324 - S3's Content-MD5 integrity check
        r = s3_call(self.s3.upload_part, f"upload part {number} of {self.key}",
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                    PartNumber=number, Body=data,
                    ContentMD5=base64.b64encode(md5).decode())
        self.parts.append({"ETag": r["ETag"], "PartNumber": number})
        self.md5s.append(md5)
        if self.on_part is not None:
            self.on_part(number, self.total - len(self.buf))


def copy_archive(ssh: SshClient, s3: Any, bucket: str, *, path: str, key: str, size: int,
                 vmid: int, volid: str, ctime: int, timeout: float = 3600,
                 on_part: Callable[[int, int], None] | None = None) -> CopyResult:
    """Copy the archive at ``path`` on the node to ``key``; idempotent.

    Skips the upload when a verified object of the same size is already there;
    aborts unfinished uploads of ``key`` first; raises :class:`OffsiteMismatch`
    when the bytes read differ from the node's size/SHA-256 (nothing is left
    behind), a transient :class:`ServiceError` when S3 or SSH failed half-way.
    """
    started = time.monotonic()
    existing = head(s3, bucket, key)
    if existing is not None and is_verified(existing) and existing.size == size:
        return CopyResult(key, size, existing.metadata[META_SHA256], "present")
    stale = abort_stale_uploads(s3, bucket, key)
    digest = remote_sha256(ssh, path, timeout=timeout)
    meta = {META_SIZE: str(size), META_SHA256: digest, META_VOLID: volid,
            META_VMID: str(vmid), META_CTIME: str(ctime)}
    created = s3_call(s3.create_multipart_upload, f"create upload {key}", Bucket=bucket,
                      Key=key, Metadata=meta, ContentType="application/octet-stream")
    upload_id = created["UploadId"]
    up = _Uploader(s3, bucket, key, upload_id, part_size(size), on_part)
    try:
        try:
            ssh.get_stream(path, up.write, timeout=min(timeout, 300))
        except OSError as exc:  # the file vanished or is unreadable on the node
            raise PermanentError(f"sftp read of {path}: {exc}") from None
        up.finish()
        got = up.sha.hexdigest()
        if up.total != size or got != digest:
            raise OffsiteMismatch(
                f"{volid}: streamed {up.total} bytes sha256 {got[:12]}…, the node has "
                f"{size} bytes sha256 {digest[:12]}… (the archive changed while read?)")
        s3_call(s3.complete_multipart_upload, f"complete {key}", Bucket=bucket, Key=key,
                UploadId=upload_id, MultipartUpload={"Parts": up.parts})
    except BaseException:
        try:
            s3_call(s3.abort_multipart_upload, f"abort {key}", Bucket=bucket, Key=key,
                    UploadId=upload_id)
        except LabkeeperError as exc:
            log.warning("could not abort the upload of %s (the next copy will): %s", key, exc)
        raise
    verify_object(s3, bucket, key, size=size, sha256=digest, part_md5s=up.md5s)
    return CopyResult(key, size, digest, "copied", len(up.parts), time.monotonic() - started,
                      stale)


def verify_object(s3: Any, bucket: str, key: str, *, size: int, sha256: str,
                  part_md5s: list[bytes] | None = None) -> RemoteObject:
    """Read the object's HEAD back and check length, metadata and (if S3-style) ETag;
    a mismatch deletes the object and raises :class:`OffsiteMismatch`."""
    obj = head(s3, bucket, key)
    problems = []
    if obj is None:
        raise ServiceError(f"s3 {key}: not found right after the upload", service="s3",
                           transient=True)
    if obj.size != size:
        problems.append(f"length {obj.size} != {size}")
    if obj.metadata.get(META_SHA256) != sha256 or obj.metadata.get(META_SIZE) != str(size):
        problems.append("metadata missing or different")
    if part_md5s and re.fullmatch(r"[0-9a-f]{32}-\d+", obj.etag) \
            and obj.etag != multipart_etag(part_md5s):
        problems.append(f"ETag {obj.etag} != {multipart_etag(part_md5s)}")
    if problems:
        s3_call(s3.delete_object, f"delete {key}", Bucket=bucket, Key=key)
        raise OffsiteMismatch(f"s3 {key} failed verification: {'; '.join(problems)}")
    return obj


def apply_offsite_retention(s3: Any, bucket: str, prefix: str, vmid: int, *, keep_last: int,
                            max_age_days: int | None, dry_run: bool = False,
                            now: float | None = None) -> tuple[list[str], list[str]]:
    """Delete one guest's surplus copies (and unverified objects); returns (kept, deleted)."""
    where = f"{prefix}{vmid}/"
    objects = list_objects(s3, bucket, where)
    keep, delete = retention_plan(objects, keep_last, max_age_days,
                                  now if now is not None else time.time())
    if not dry_run:
        for key in delete:
            s3_call(s3.delete_object, f"delete {key}", Bucket=bucket, Key=key)
    return keep, delete
