"""Off-site copies onto another SSH host (``offsite: {host: nas, path: /volume1/offsite}``):
SFTP from the node into ``<path>/<vmid>/`` on the host, which needs only SFTP (the hashing
happens on the node and on the way).

The archive is written as ``.<name>.partial`` (mode 0600) and renamed into place only
when its length and SHA-256 match the node's ``sha256sum``; only then is the sidecar
``<name>.sha256`` written (atomically, ``sha256sum -c`` format). A copy is good only with
its sidecar: a rerun rewrites an archive without one (the old sidecar is removed first,
so it never vouches for other bytes); retention removes bad copies and stale partials.
"""

from __future__ import annotations

import contextlib
import hashlib
import posixpath
import re
import stat as statmod
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from labkeeper.errors import ConfigError, LabkeeperError, PermanentError, SSHConnectError
from labkeeper.inventory import Inventory, Offsite
from labkeeper.offsite.copies import (
    META_CTIME,
    META_SHA256,
    META_SIZE,
    CopyResult,
    OffsiteMismatch,
    RemoteObject,
    retention_plan,
)
from labkeeper.offsite.node import remote_sha256
from labkeeper.secrets import redact
from labkeeper.ssh import SshClient, SshTarget
from labkeeper.vzdump import archive_time

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
    partial = posixpath.join(dest_dir, partial_name(name))
    step_timeout = min(timeout, 300)
    with host.sftp(timeout=step_timeout) as dst:
        present = _present_or_cleared(host, dst, dest_dir, name, size)
        if present is not None:
            return CopyResult(final, size, present, "present")
        digest = remote_sha256(node, path, timeout=timeout)
        try:
            total, got = _stream(node, host, dst, path, partial, size, step_timeout,
                                 on_progress)
            if total != size or got != digest:
                raise OffsiteMismatch(
                    f"{name}: streamed {total} bytes sha256 {got[:12]}…, the node has "
                    f"{size} bytes sha256 {digest[:12]}… (the archive changed while read?)")
            written = dst.stat(partial).st_size
            if written != size:
                raise OffsiteMismatch(f"{name}: the host holds {written} bytes of {size}")
            dst.posix_rename(partial, final)
            _write_atomic(dst, final + SIDECAR, sidecar_text(digest, name))
        except OSError as exc:
            with contextlib.suppress(Exception):
                _remove_quietly(dst, partial)
            raise _host_error(host, "cannot write", final, exc, node) from None
        except BaseException:
            with contextlib.suppress(Exception):
                _remove_quietly(dst, partial)
            raise
    return CopyResult(final, size, digest, "copied", 0, time.monotonic() - started)


def _present_or_cleared(host: SshClient, dst: Any, dest_dir: str, name: str, size: int
                        ) -> str | None:
    """The digest of a good copy of ``name`` already in ``dest_dir`` (same size, with a
    sidecar); otherwise None, with the directory made and a stale sidecar and partial
    file removed (an old sidecar must never vouch for new bytes)."""
    final = posixpath.join(dest_dir, name)
    side = final + SIDECAR
    try:
        _makedirs(dst, dest_dir)
        try:
            existing = dst.stat(final).st_size
        except FileNotFoundError:
            existing = None
        text = _read_small(dst, side) if existing == size else None
        present = parse_sidecar(text, name) if text is not None else None
        if present is not None:
            return present
        _remove_quietly(dst, side)
        _remove_quietly(dst, posixpath.join(dest_dir, partial_name(name)))
    except OSError as exc:
        raise _host_error(host, "cannot prepare", dest_dir, exc) from None
    return None


def _stream(node: SshClient, host: SshClient, dst: Any, path: str, partial: str, size: int,
            step_timeout: float, on_progress: Callable[[int], None] | None
            ) -> tuple[int, str]:
    """Stream ``path`` on the node into ``partial`` on the host (mode 0600), hashing on the
    way; returns (bytes, SHA-256 hex digest)."""
    sha = hashlib.sha256()
    total = 0
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
                while chunk := fin.read(_HOST_CHUNK):
                    fout.write(chunk)
                    sha.update(chunk)
                    total += len(chunk)
                    if on_progress is not None:
                        on_progress(total)
    return total, sha.hexdigest()


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
