"""Path-set DR drill: restore a random sample of files and compare them with the host.

:func:`paths_drill` returns a :class:`labkeeper.drill.DrillResult` (kind ``paths``,
target ``<host>/<set>``) and never raises for a drill that failed.

1. **Latest snapshot** of the set's series (tags ``labkeeper``,
   ``paths:<host>/<set>``, ``kind:paths``; ``--host <lab>``), the same series the
   backup flow writes and retention keeps. RPO = its age, against
   ``drills.paths.rpo_hours``.
2. **Sample.** ``restic ls --json`` of the snapshot is streamed line by line into a
   reservoir sample (bounded memory for a million-file photo library) of
   ``drills.paths.sample_files`` regular files of at most ``max_file_mb`` each. The
   ``ls`` output carries what restic *recorded* for each file: size and mtime.
3. **Restore.** Each sampled file is streamed out of the repository by ``restic dump``
   into ``sha256sum`` on the worker (no temporary file); its length must equal the
   recorded size.
4. **Source.** On the host, over SSH (the set's host, its ``sudo`` setting), one
   fixed script per file (:func:`source_hash_argv`): ``stat`` (size, mtime, ctime),
   ``sha256sum``, ``stat`` again. The path is the script's positional argument
   ``$1``, never parsed by a shell; a missing file exits 66 (locale-independent).
5. **Judge** (:func:`judge_file`), per file:

   - the restored bytes differ in length from what restic recorded → **failure**
     (the repository gives back something else than it stored);
   - the same SHA-256 as the file on the host → identical;
   - deleted on the host since the backup → reported, not a failure;
   - changed since the backup — size or mtime not the ones restic recorded, or an
     mtime newer than the snapshot — → reported, not a failure;
   - changed while the drill hashed it (the two ``stat`` calls differ) → reported;
   - a different content in a file whose size and mtime are exactly as recorded →
     **failure**: the copy on the host or the one in the backup is corrupt (bit rot,
     a damaged pack), or something rewrote the file and kept its mtime — a person
     must look either way;
   - the file cannot be read on the host → **failure** (not verified).

   mtimes are compared in whole seconds (portable ``stat -c %Y``, busybox too).
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import secrets as pysecrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from labkeeper import path_backup, restic
from labkeeper.drill.hashing import dump_sha256
from labkeeper.drill.plan import find_path_set, path_set_target
from labkeeper.drill.result import DrillResult, objective_checks
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Inventory, PathBackup
from labkeeper.ssh import SshClient, SshTarget, connect

logger = logging.getLogger(__name__)

GONE_EXIT = 66
"""The source script's exit code for a path that does not exist on the host."""

SOURCE_SCRIPT = (
    '[ -e "$1" ] || [ -L "$1" ] || exit 66\n'
    'stat -c "%s %Y %Z" -- "$1" || exit 67\n'
    'sha256sum -- "$1" || exit 68\n'
    'exec stat -c "%s %Y %Z" -- "$1"\n'
)
"""Fixed text; the file's path only ever arrives as ``$1`` (quoted expansions)."""

SOURCE_SCRIPT_SUDO_SHA256SUM = (
    '[ -e "$1" ] || [ -L "$1" ] || { [ -x "${1%/*}/" ] && exit 66; exit 67; }\n'
    'stat -c "%s %Y %Z" -- "$1" || exit 67\n'
    'sudo -n -- sha256sum -- "$1" || exit 68\n'
    'exec stat -c "%s %Y %Z" -- "$1"\n'
)
"""For ``sudo: restic``, whose sudoers allows restic and sha256sum but no shell: the
script runs as the SSH user and only the hash runs under sudo. A file is "gone" only
when its directory can be searched; otherwise it is a stat error, never a silent
"deleted"."""

_HASH = re.compile(r"\\?([0-9a-f]{64})\b")


# =====================================================================================
# argv (pure)
# =====================================================================================


def source_hash_argv(path: str, *,
                     sudo: bool | Literal["restic"] = False) -> tuple[str, ...]:
    """The remote argv hashing one file on the host: ``sh -c SCRIPT labkeeper-drill
    PATH`` (``sudo -n --`` first for a set backed up with ``sudo: true``; for
    ``sudo: restic`` only sha256sum runs under sudo). The SSH runner quotes every
    element, so PATH reaches the script as one argument whatever it holds (spaces,
    quotes, ``$``, ``*``, a leading ``-``)."""
    if not path.startswith("/"):
        raise ValueError(f"not an absolute path: {path!r}")
    if "\x00" in path:
        raise ValueError("a path cannot contain NUL")
    if sudo == "restic":
        return ("sh", "-c", SOURCE_SCRIPT_SUDO_SHA256SUM, "labkeeper-drill", path)
    argv = ("sh", "-c", SOURCE_SCRIPT, "labkeeper-drill", path)
    return ("sudo", "-n", "--", *argv) if sudo else argv


# =====================================================================================
# restic ls with what restic recorded (pure parse)
# =====================================================================================


class SnapNode(BaseModel):
    """One node of ``restic ls --json``: what restic recorded at backup time."""

    model_config = ConfigDict(extra="ignore")

    type: str = ""
    path: str = ""
    size: int | None = None
    mtime: datetime | None = None
    struct_type: str = ""


def parse_ls_line(line: str) -> SnapNode | None:
    """A regular-file node of one ``restic ls --json`` line, else None."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        node = SnapNode.model_validate_json(line)
    except ValidationError:
        return None
    if node.struct_type != "node" or node.type != "file" or not node.path:
        return None
    return node


class Reservoir:
    """A uniform random sample of ``k`` items of a stream of unknown length
    (algorithm R), in bounded memory."""

    def __init__(self, k: int, rng: random.Random) -> None:
        if k < 1:
            raise ValueError("k must be ≥ 1")
        self.k = k
        self.rng = rng
        self.items: list[Any] = []
        self.seen = 0

    def offer(self, item: Any) -> None:
        self.seen += 1
        if len(self.items) < self.k:
            self.items.append(item)
            return
        j = self.rng.randrange(self.seen)
        if j < self.k:
            self.items[j] = item


# =====================================================================================
# the file on the host (pure parse) and the verdict (pure)
# =====================================================================================


@dataclass(frozen=True)
class SourceFile:
    """What the host said about one file."""

    state: Literal["ok", "gone", "error"]
    sha256: str = ""
    size: int | None = None
    mtime: int | None = None
    ctime: int | None = None
    changed_during: bool = False
    error: str = ""


def _stat_line(line: str) -> tuple[int, int, int] | None:
    parts = line.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]), int(parts[2])


def parse_source(returncode: int | None, stdout: str, stderr: str) -> SourceFile:
    """The source script's answer (see :data:`SOURCE_SCRIPT`)."""
    if returncode == GONE_EXIT:
        return SourceFile("gone")
    err = " | ".join(ln.strip() for ln in stderr.strip().splitlines()[-2:] if ln.strip())
    if returncode != 0:
        what = {67: "stat failed", 68: "sha256sum failed"}.get(
            returncode or 0, f"exit {returncode}")
        return SourceFile("error", error=f"{what}: {err}" if err else what)
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if len(lines) != 3:
        return SourceFile("error", error=f"unexpected output ({len(lines)} lines)")
    before, after = _stat_line(lines[0]), _stat_line(lines[2])
    found = _HASH.match(lines[1].strip())
    if before is None or after is None or found is None:
        return SourceFile("error", error="unexpected output from stat/sha256sum")
    size, mtime, ctime = before
    return SourceFile("ok", sha256=found.group(1), size=size, mtime=mtime, ctime=ctime,
                      changed_during=before != after)


Status = Literal["identical", "changed", "deleted", "changed-during", "mismatch",
                 "size-mismatch", "unreadable"]


@dataclass(frozen=True)
class Verdict:
    status: Status
    ok: bool
    detail: str


def _ts(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return datetime.fromtimestamp(seconds, tz=UTC).isoformat(timespec="seconds")


def judge_file(node: SnapNode, restored_sha: str, restored_size: int, source: SourceFile,
               snapshot_time: datetime) -> Verdict:
    """Compare one restored file with the host (rules in the module docstring)."""
    short = f"sha256 {restored_sha[:16]}…"
    if node.size is not None and restored_size != node.size:
        return Verdict("size-mismatch", False,
                       f"restic dump gave {restored_size} bytes, the snapshot records "
                       f"{node.size}")
    if source.state == "gone":
        return Verdict("deleted", True, f"deleted on the host since the backup (restored "
                                        f"{restored_size} bytes, {short})")
    if source.state == "error":
        return Verdict("unreadable", False, f"not verified: cannot hash it on the host "
                                            f"({source.error})")
    if source.sha256 == restored_sha:
        return Verdict("identical", True, f"identical on the host ({restored_size} bytes, "
                                          f"{short})")
    if source.changed_during:
        return Verdict("changed-during", True, "changed on the host while the drill "
                                               "hashed it; not compared")
    recorded_mtime = int(node.mtime.timestamp()) if node.mtime is not None else None
    snap_s = snapshot_time.timestamp()
    reasons = []
    if source.size != node.size:
        reasons.append(f"size {source.size} (recorded {node.size})")
    if recorded_mtime is not None and source.mtime != recorded_mtime:
        reasons.append(f"mtime {_ts(source.mtime)} (recorded {_ts(recorded_mtime)})")
    elif source.mtime is not None and source.mtime > snap_s:
        reasons.append(f"mtime {_ts(source.mtime)} is newer than the snapshot")
    if reasons:
        return Verdict("changed", True, "changed on the host since the backup: "
                                        + ", ".join(reasons) + "; the restored copy is "
                                        f"the backed-up version ({short})")
    hint = ""
    if source.ctime is not None and source.ctime > snap_s:
        hint = (f"; its ctime {_ts(source.ctime)} is newer than the snapshot: rewritten "
                "with its mtime kept?")
    return Verdict("mismatch", False,
                   f"CONTENT DIFFERS from the host although size ({source.size}) and mtime "
                   f"({_ts(source.mtime)}) are as restic recorded them: the file on the "
                   f"host or the backup is corrupt (restored {short}, host sha256 "
                   f"{source.sha256[:16]}…){hint}")


# =====================================================================================
# the drill
# =====================================================================================


def paths_drill(inv: Inventory, target: str, *,
                rng: random.Random | None = None,
                now: Callable[[], datetime] | None = None,
                connector: Callable[[SshTarget], SshClient] = connect) -> DrillResult:
    """Restore a random sample of path set ``target``'s latest snapshot and compare each
    file with the host (see the module docstring)."""
    clock = now or (lambda: datetime.now(tz=UTC))
    started = time.monotonic()
    settings = inv.drills.paths
    result = DrillResult("paths", target, rpo_objective_s=settings.rpo_hours * 3600)
    try:
        pb = find_path_set(inv, target)
        result.target = path_set_target(pb)
        _paths_drill(inv, pb, result, rng=rng or pysecrets.SystemRandom(),
                     clock=clock, connector=connector)
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    objective_checks(result)
    result.duration_s = time.monotonic() - started
    logger.info("paths drill %s: %s — %s", result.target, result.status.upper(),
                result.summary())
    return result


def _paths_drill(inv: Inventory, pb: PathBackup, result: DrillResult, *,
                 rng: random.Random, clock: Callable[[], datetime],
                 connector: Callable[[SshTarget], SshClient]) -> None:
    label = path_backup.series_label(pb.host, pb.name)
    repo_name = inv.repository_for(pb).name
    repo = path_backup.open_repo(inv, pb)
    snap = _latest_snapshot(inv, pb, repo, repo_name, result, clock=clock)
    if snap is None:
        return
    sid = snap.short_id or snap.id[:8]
    files, seen = _sample(inv, repo, snap.id, sid, result, rng=rng)
    if not files:
        return
    logger.info("%s: comparing %d of %d files of snapshot %s with %s", label, len(files), seen,
                sid, pb.host)
    _compare(inv, pb, repo, snap, files, result, connector=connector)


def _latest_snapshot(inv: Inventory, pb: PathBackup, repo: restic.Repo, repo_name: str,
                     result: DrillResult, *, clock: Callable[[], datetime]
                     ) -> restic.Snapshot | None:
    """The set's latest snapshot (RPO measured), or None (failed)."""
    label = path_backup.series_label(pb.host, pb.name)
    snaps = restic.find_snapshots(repo, tags=path_backup.series_tags(pb.host, pb.name),
                                  host=inv.lab.name)
    if not snaps:
        result.fail(f"no snapshot of {label} in repository {repo_name}")
        return None
    snap = snaps[-1]
    sid = snap.short_id or snap.id[:8]
    result.source = f"{sid} ({', '.join(snap.paths)})"
    result.rpo_s = max(0.0, (clock() - snap.time).total_seconds())
    result.check("snapshot", True, f"{sid} of {snap.time.isoformat(timespec='seconds')}")
    if sorted(snap.paths) != sorted(map(str, pb.paths)):
        result.notes.append(f"snapshot {sid} holds {', '.join(snap.paths)}; the inventory "
                            f"now says {', '.join(map(str, pb.paths))}")
    return snap


def _sample(inv: Inventory, repo: restic.Repo, snapshot_id: str, sid: str,
            result: DrillResult, *, rng: random.Random) -> tuple[list[SnapNode], int]:
    """A reservoir sample of the snapshot's regular files small enough to compare,
    sorted by path, and how many files it was drawn from; checks ``sample``."""
    settings = inv.drills.paths
    limit = int(settings.max_file_mb * 1024 * 1024)
    sample = Reservoir(settings.sample_files, rng)
    too_big = 0

    def offer(line: str) -> None:
        nonlocal too_big
        node = parse_ls_line(line)
        if node is None:
            return
        if node.size is not None and node.size > limit:
            too_big += 1
            return
        sample.offer(node)

    restic.run_restic(repo, restic.ls_argv(repo, snapshot_id), timeout=3600,
                      on_stdout_line=offer)
    files: list[SnapNode] = sorted(sample.items, key=lambda n: n.path)
    if too_big:
        result.notes.append(f"{too_big} file(s) larger than {settings.max_file_mb:g} MiB "
                            "left out of the sample")
    if not files:
        result.check("sample", False, f"snapshot {sid} holds no regular file "
                                      f"{'small enough ' if too_big else ''}to compare")
    else:
        result.check("sample", True, f"{len(files)} of {sample.seen} file(s) of {sid}")
    return files, sample.seen


def _compare(inv: Inventory, pb: PathBackup, repo: restic.Repo, snap: restic.Snapshot,
             files: list[SnapNode], result: DrillResult, *,
             connector: Callable[[SshTarget], SshClient]) -> None:
    """Restore and hash each sampled file, hash it on the host, judge; sum it up."""
    label = path_backup.series_label(pb.host, pb.name)
    counts: dict[str, int] = {}
    restored_bytes = 0
    t0 = time.monotonic()
    target = path_backup.ssh_target_for(inv, pb)
    with contextlib.closing(connector(target)) as client:
        for node in files:
            try:
                digest, size = dump_sha256(repo, snap.id, node.path,
                                           timeout=_budget(node.size))
            except LabkeeperError as exc:
                if exc.transient:
                    raise
                result.check(f"file {node.path}", False, f"restore failed: {exc}")
                counts["restore failed"] = counts.get("restore failed", 0) + 1
                continue
            restored_bytes += size
            res = client.run(source_hash_argv(node.path, sudo=pb.sudo),
                             timeout=_budget(node.size), check=False)
            source = parse_source(res.returncode, res.stdout, res.stderr)
            verdict = judge_file(node, digest, size, source, snap.time)
            counts[verdict.status] = counts.get(verdict.status, 0) + 1
            result.check(f"file {node.path}", verdict.ok, verdict.detail)
            logger.info("%s: %s: %s", label, node.path, verdict.detail)
    elapsed = time.monotonic() - t0
    result.notes.append("sample: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
                        + f"; {restored_bytes} bytes restored and hashed in {elapsed:.1f} s")
    if counts.get("identical", 0) == 0 and all(k in ("changed", "deleted", "changed-during")
                                               for k in counts):
        result.notes.append("no sampled file was unchanged on the host: nothing could be "
                            "compared byte for byte this time")


def _budget(size: int | None) -> float:
    """Seconds allowed to stream or hash one file (≥ 10 MB/s, at least 2 minutes)."""
    return max(120.0, (size or 0) / 10e6)
