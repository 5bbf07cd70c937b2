"""Off-site copies of vzdump archives, with no local temporary file: SFTP from the node
(``node``) straight into an S3 multipart upload (``s3``: Backblaze B2's S3 API, or any
S3), or into a directory on another SSH host (``host``: a NAS at a friend's, a storage
box). Either way the bytes are hashed on the way and must match the node's
``sha256sum`` before a copy counts, and retention counts only verified copies
(``copies``).
"""

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
    utc,
)
from labkeeper.offsite.host import (
    PARTIAL,
    PARTIAL_MAX_AGE,
    SIDECAR,
    HostEntry,
    apply_host_retention,
    copy_archive_to_host,
    host_dir,
    host_plan,
    host_ssh_target,
    parse_sidecar,
    partial_name,
    sidecar_text,
)
from labkeeper.offsite.node import node_ssh_target, parse_sha256sum, remote_sha256
from labkeeper.offsite.s3 import (
    MAX_PARTS,
    MIN_PART,
    MiB,
    abort_stale_uploads,
    apply_offsite_retention,
    copy_archive,
    head,
    incomplete_uploads,
    list_objects,
    log,
    multipart_etag,
    object_key,
    part_size,
    s3_call,
    target_for,
    verify_object,
)

__all__ = [
    "MAX_PARTS", "META_CTIME", "META_SHA256", "META_SIZE", "META_VMID", "META_VOLID",
    "MIN_PART", "PARTIAL", "PARTIAL_MAX_AGE", "SIDECAR", "CopyResult", "HostEntry", "MiB",
    "OffsiteMismatch", "RemoteObject", "abort_stale_uploads", "apply_host_retention",
    "apply_offsite_retention", "copy_archive", "copy_archive_to_host", "head", "host_dir",
    "host_plan", "host_ssh_target", "incomplete_uploads", "is_verified", "list_objects", "log",
    "multipart_etag", "node_ssh_target", "object_key", "parse_sha256sum", "parse_sidecar",
    "part_size", "partial_name", "remote_sha256", "retention_plan", "s3_call",
    "sidecar_text", "target_for", "utc", "verify_object",
]
