"""Off-site copies of vzdump archives, no local temporary file: SFTP from the node
straight into an S3 multipart upload (Backblaze B2's S3 API, or any S3), or SFTP from
the node into a directory on another SSH host (a NAS at a friend's, a storage box).

Safety, S3 target:

* the object appears only on ``CompleteMultipartUpload``, so a copy that dies
  half-way leaves no object — at most an incomplete upload, which the next
  attempt for the same key aborts first (:func:`abort_stale_uploads`);
* the archive's size and SHA-256 (hashed on the node with ``sha256sum`` before
  the upload) are stored as object metadata; the bytes streamed are hashed on
  the way and must match before the upload is completed; afterwards the object
  is read back (HEAD): length, metadata and the multipart ETag (MD5 of the part
  MD5s, where the server uses that scheme) must all agree, and each part is sent
  with its Content-MD5;
* a copy is *good* only when its metadata is complete and matches
  (:func:`is_verified`); retention counts only good copies and removes the rest.

Keys: ``<prefix><vmid>/<archive file name>`` — the same archive always maps to
the same key, so a rerun skips what is already there and verified.

Safety, SSH host target (``offsite: {host: nas, path: /volume1/offsite}``):

* the archive is written as ``<path>/<vmid>/.<name>.partial`` (mode 0600), hashed
  on the way, and renamed to ``<path>/<vmid>/<name>`` only when its length and
  SHA-256 match what ``sha256sum`` said on the node; only then is the sidecar
  ``<name>.sha256`` written (atomically, ``sha256sum -c`` format, so the copy can
  be checked on the host at any time);
* a copy is *good* only with its sidecar: a rerun rewrites an archive without
  one (the old sidecar is removed before a file is replaced, so it never vouches
  for other bytes); retention counts only good copies and removes the rest,
  and partial files left by a crashed copy once they are a few hours old;
* the host needs only SFTP (no shell): the hashing happens on the node and on
  the way.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import math
import posixpath
import re
import stat as statmod
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from labkeeper import b2
from labkeeper.errors import (
    ConfigError,
    LabkeeperError,
    PermanentError,
    ServiceError,
    SSHConnectError,
)
from labkeeper.inventory import Inventory, Offsite
from labkeeper.secrets import redact, resolve
from labkeeper.ssh import SshClient, SshTarget
from labkeeper.vzdump import archive_time

log = logging.getLogger("labkeeper.offsite")

MiB = 1024 * 1024
MIN_PART = 8 * MiB
MAX_PARTS = 9000
META_SIZE = "size"
META_SHA256 = "sha256"
META_VOLID = "volid"
META_VMID = "vmid"
META_CTIME = "ctime"

_TRANSIENT_CODES = {"500", "502", "503", "504", "RequestTimeout", "SlowDown", "InternalError",
                    "ServiceUnavailable", "RequestTimeTooSkewed"}


class OffsiteMismatch(PermanentError):
    """What was uploaded is not what the node holds (changed while read, or corrupt)."""


# ====================================================================== pure helpers


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


def parse_sha256sum(output: str, path: str) -> str:
    """The digest from ``sha256sum -- PATH`` output."""
    m = re.match(r"^\\?([0-9a-f]{64})\s+\*?(.*)$", output.strip())
    if not m:
        raise ServiceError(f"sha256sum of {path}: unexpected output", service="ssh")
    return m.group(1)


@dataclass(frozen=True)
class RemoteObject:
    key: str
    size: int
    last_modified: float
    metadata: dict[str, str]
    etag: str = ""

    @property
    def archive_time(self) -> float:
        """When the archive was made (its ``ctime`` metadata, else the upload time)."""
        try:
            return float(self.metadata.get(META_CTIME, ""))
        except ValueError:
            return self.last_modified


def is_verified(obj: RemoteObject) -> bool:
    """Our metadata is there and agrees with the object's length."""
    sha = obj.metadata.get(META_SHA256, "")
    return (re.fullmatch(r"[0-9a-f]{64}", sha) is not None
            and obj.metadata.get(META_SIZE) == str(obj.size))


def retention_plan(objects: Iterable[RemoteObject], keep_last: int,
                   max_age_days: int | None, now: float) -> tuple[list[str], list[str]]:
    """(keep, delete) keys of one guest's copies.

    The newest ``keep_last`` *verified* copies are always kept; older verified
    copies are kept while younger than ``max_age_days`` (if set); unverified
    objects (no or wrong metadata) never count and are deleted.
    """
    good = sorted((o for o in objects if is_verified(o)), key=lambda o: (o.archive_time, o.key),
                  reverse=True)
    bad = [o.key for o in objects if not is_verified(o)]
    keep: list[str] = []
    delete: list[str] = list(bad)
    for i, obj in enumerate(good):
        young = max_age_days is not None and now - obj.archive_time < max_age_days * 86400
        (keep if i < keep_last or young else delete).append(obj.key)
    return keep, sorted(delete)


# ====================================================================== S3 plumbing


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


# ====================================================================== the copy


@dataclass(frozen=True)
class CopyResult:
    key: str
    size: int
    sha256: str
    status: str  # "copied" | "present"
    parts: int = 0
    seconds: float = 0.0
    aborted_stale: int = 0


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


def remote_sha256(ssh: SshClient, path: str, *, timeout: float) -> str:
    result = ssh.run(("sha256sum", "--", path), timeout=timeout)
    return parse_sha256sum(result.stdout, path)


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


# ====================================================================== SSH host target

SIDECAR = ".sha256"
PARTIAL = ".partial"
PARTIAL_MAX_AGE = 6 * 3600
"""A partial file older than this is left by a crashed copy (retention removes it)."""
_HOST_CHUNK = 1 << 20


def host_dir(path: str, vmid: int) -> str:
    """Where one guest's copies live on the host: ``<path>/<vmid>``."""
    return posixpath.join(path, str(vmid))


def partial_name(name: str) -> str:
    return f".{name}{PARTIAL}"


def sidecar_text(digest: str, name: str) -> str:
    """The sidecar: one ``sha256sum`` line (``sha256sum -c name.sha256`` checks it)."""
    return f"{digest}  {name}\n"


def parse_sidecar(text: str, name: str) -> str | None:
    """The digest the sidecar gives ``name``; None when it is missing or garbled."""
    for line in text.splitlines():
        m = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line.strip())
        if m and m.group(2) == name:
            return m.group(1)
    return None


@dataclass(frozen=True)
class HostEntry:
    """A file in a guest's directory on the off-site host (from an SFTP listing)."""

    name: str
    size: int
    mtime: float


def _is_archive_name(name: str) -> bool:
    return name.startswith("vzdump-") and not name.endswith((SIDECAR, PARTIAL))


def host_plan(entries: Iterable[HostEntry], digests: Mapping[str, str], *, keep_last: int,
              max_age_days: int | None, now: float) -> tuple[list[str], list[str]]:
    """(keep, delete) file names in one guest's directory on the host (pure).

    Archives (``vzdump-*``) with a sidecar digest are good copies, judged by
    :func:`retention_plan` (``keep_last`` newest, plus those younger than
    ``max_age_days``); archives without one are deleted. A deleted archive takes
    its sidecar along (listed first: the sidecar goes before the archive); so do
    sidecars without an archive and partial files older than
    :data:`PARTIAL_MAX_AGE`. Other files are never touched.
    """
    files = {e.name: e for e in entries}
    objects: list[RemoteObject] = []
    for e in files.values():
        if not _is_archive_name(e.name):
            continue
        digest = digests.get(e.name)
        meta: dict[str, str] = {}
        if digest is not None:
            made = archive_time(e.name)
            meta = {META_SHA256: digest, META_SIZE: str(e.size),
                    META_CTIME: str(made if made is not None else e.mtime)}
        objects.append(RemoteObject(e.name, e.size, e.mtime, meta))
    keep, drop = retention_plan(objects, keep_last, max_age_days, now)
    delete: list[str] = []
    for name in drop:
        if name + SIDECAR in files:
            delete.append(name + SIDECAR)
        delete.append(name)
    for name in sorted(files):
        if name.endswith(SIDECAR) and _is_archive_name(name[:-len(SIDECAR)]) \
                and name[:-len(SIDECAR)] not in files:
            delete.append(name)  # a sidecar whose archive is gone
        elif name.startswith(".vzdump-") and name.endswith(PARTIAL) \
                and now - files[name].mtime > PARTIAL_MAX_AGE:
            delete.append(name)
    return keep, delete


def _host_error(host: SshClient, what: str, path: str, exc: OSError,
                node: SshClient | None = None) -> LabkeeperError:
    """A file error on the host is permanent (disk full, read-only, no permission); an
    OSError because a connection dropped (paramiko: "Socket is closed") is not."""
    detail = redact(str(exc)) or type(exc).__name__
    for client in (host, node):
        if client is not None and not client.is_active:
            return SSHConnectError(f"ssh {client.target.name}: connection lost during the "
                                   f"offsite copy ({what} {path}: {detail})")
    return PermanentError(f"offsite host {host.target.name}: {what} {path}: {detail}")


def _makedirs(sftp: Any, path: str) -> None:
    parts = [p for p in path.split("/") if p]
    current = "/" if path.startswith("/") else ""
    for part in parts:
        current = posixpath.join(current, part) if current else part
        try:
            st = sftp.stat(current)
        except FileNotFoundError:
            sftp.mkdir(current, mode=0o700)
            continue
        if not statmod.S_ISDIR(st.st_mode or 0):
            raise NotADirectoryError(f"{current} is not a directory")


def _remove_quietly(sftp: Any, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        sftp.remove(path)


def _read_small(sftp: Any, path: str, limit: int = 4096) -> str | None:
    try:
        with sftp.open(path, "rb") as f:
            return f.read(limit).decode("utf-8", "replace")
    except FileNotFoundError:
        return None


def _write_atomic(sftp: Any, path: str, text: str) -> None:
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}{PARTIAL}")
    with sftp.open(tmp, "wb") as f:
        f.chmod(0o600)
        f.write(text.encode())
    sftp.posix_rename(tmp, path)


def copy_archive_to_host(node: SshClient, host: SshClient, *, path: str, dest_dir: str,
                         size: int, timeout: float = 3600,
                         on_progress: Callable[[int], None] | None = None) -> CopyResult:
    """Copy the archive at ``path`` on the node into ``dest_dir`` on the host; idempotent.

    Skips the copy when the archive is already there with the same size and a
    sidecar; otherwise streams node → host over two SFTP sessions into a partial
    file, checks length and SHA-256 against the node's ``sha256sum``, renames it
    into place and writes the sidecar. Raises :class:`OffsiteMismatch` when the
    bytes differ (the partial file is removed), a transient
    :class:`~labkeeper.errors.SSHConnectError` when a connection dropped half-way
    (the next attempt starts over), a :class:`PermanentError` for file errors
    (the archive vanished on the node; the host's disk is full or read-only).
    """
    started = time.monotonic()
    name = posixpath.basename(path)
    final = posixpath.join(dest_dir, name)
    side = final + SIDECAR
    partial = posixpath.join(dest_dir, partial_name(name))
    step_timeout = min(timeout, 300)
    with host.sftp(timeout=step_timeout) as dst:
        try:
            _makedirs(dst, dest_dir)
            try:
                existing = dst.stat(final).st_size
            except FileNotFoundError:
                existing = None
            text = _read_small(dst, side) if existing == size else None
            present = parse_sidecar(text, name) if text is not None else None
            if present is not None:
                return CopyResult(final, size, present, "present")
            _remove_quietly(dst, side)  # an old sidecar must never vouch for new bytes
            _remove_quietly(dst, partial)
        except OSError as exc:
            raise _host_error(host, "cannot prepare", dest_dir, exc) from None
        digest = remote_sha256(node, path, timeout=timeout)
        sha = hashlib.sha256()
        total = 0
        try:
            with node.sftp(timeout=step_timeout) as src:
                try:
                    fin = src.open(path, "rb")
                except OSError as exc:
                    raise PermanentError(f"sftp read of {path} on {node.target.name}: "
                                         f"{exc}") from None
                with fin:
                    fin.prefetch(size, max_concurrent_requests=64)
                    try:
                        fout = dst.open(partial, "wb")
                        fout.chmod(0o600)
                    except OSError as exc:
                        raise _host_error(host, "cannot write", partial, exc) from None
                    with fout:
                        fout.set_pipelined(True)
                        while True:
                            chunk = fin.read(_HOST_CHUNK)
                            if not chunk:
                                break
                            fout.write(chunk)
                            sha.update(chunk)
                            total += len(chunk)
                            if on_progress is not None:
                                on_progress(total)
            got = sha.hexdigest()
            if total != size or got != digest:
                raise OffsiteMismatch(
                    f"{name}: streamed {total} bytes sha256 {got[:12]}…, the node has "
                    f"{size} bytes sha256 {digest[:12]}… (the archive changed while read?)")
            written = dst.stat(partial).st_size
            if written != size:
                raise OffsiteMismatch(f"{name}: the host holds {written} bytes of {size}")
            dst.posix_rename(partial, final)
            _write_atomic(dst, side, sidecar_text(digest, name))
        except OSError as exc:
            with contextlib.suppress(Exception):
                _remove_quietly(dst, partial)
            raise _host_error(host, "cannot write", final, exc, node) from None
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_quietly(dst, partial)
            raise
    return CopyResult(final, size, digest, "copied", 0, time.monotonic() - started)


def apply_host_retention(host: SshClient, dest_dir: str, *, keep_last: int,
                         max_age_days: int | None, dry_run: bool = False,
                         now: float | None = None) -> tuple[list[str], list[str]]:
    """Apply :func:`host_plan` to one guest's directory; returns the names of the copies
    kept and of the files deleted (archives and stale partials; sidecars go along)."""
    with host.sftp(timeout=300) as dst:
        try:
            listing = dst.listdir_attr(dest_dir)
        except FileNotFoundError:
            return [], []
        except OSError as exc:
            raise _host_error(host, "cannot list", dest_dir, exc) from None
        entries = [HostEntry(a.filename, a.st_size or 0, float(a.st_mtime or 0))
                   for a in listing if statmod.S_ISREG(a.st_mode or 0)]
        names = {e.name for e in entries}
        digests: dict[str, str] = {}
        for e in entries:
            if _is_archive_name(e.name) and e.name + SIDECAR in names:
                text = _read_small(dst, posixpath.join(dest_dir, e.name + SIDECAR))
                digest = parse_sidecar(text, e.name) if text is not None else None
                if digest is not None:
                    digests[e.name] = digest
        keep, delete = host_plan(entries, digests, keep_last=keep_last,
                                 max_age_days=max_age_days,
                                 now=now if now is not None else time.time())
        if not dry_run:
            for name in delete:
                try:
                    _remove_quietly(dst, posixpath.join(dest_dir, name))
                except OSError as exc:
                    raise _host_error(host, "cannot delete", name, exc) from None
    return keep, [n for n in delete if not n.endswith(SIDECAR)]  # copies, not their sidecars


def host_ssh_target(inv: Inventory, offsite: Offsite) -> SshTarget:
    """SSH to the off-site host (an inventory host, or a guest with an ssh section)."""
    if offsite.host is None:
        raise ConfigError("this offsite section copies to a repository, not to an SSH host")
    return SshTarget.from_spec(inv.ssh_target(offsite.host))


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


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
