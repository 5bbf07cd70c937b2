"""Repository drill: read a rotating part of the packs, restore one random snapshot byte
for byte.

``restic check --read-data-subset=n/N`` with ``n`` rotating over ``read_data_period``
drills (the position is kept under ``settings.state_dir`` and advances only after a
clean check), then one random snapshot: every file's ``restic dump`` hashed and sized
against ``restic ls``, restored again by ``restic restore --verify`` and hashed: both
must agree byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import secrets as pysecrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labkeeper import pg_backup, restic
from labkeeper.drill.hashing import dump_sha256, restore_sha256
from labkeeper.drill.result import DrillResult
from labkeeper.errors import CommandError, LabkeeperError
from labkeeper.inventory import Inventory

logger = logging.getLogger(__name__)

# =====================================================================================
# the rotating subset (pure, and its state file)
# =====================================================================================


def next_subset(previous: int | None, period: int) -> int:
    """The part ``n`` (1..period) of ``--read-data-subset n/period`` after ``previous``."""
    if period < 1:
        raise ValueError("period must be ≥ 1")
    if previous is None or not 1 <= previous <= period:
        return 1
    return previous % period + 1


def _state_file(inv: Inventory, repo_name: str) -> Path:
    return inv.settings.state_dir / "drills" / f"repository-{repo_name}.json"


def read_subset_state(inv: Inventory, repo_name: str) -> int | None:
    try:
        data = json.loads(_state_file(inv, repo_name).read_text())
        return int(data["last_subset"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_subset_state(inv: Inventory, repo_name: str, subset: int, period: int) -> None:
    path = _state_file(inv, repo_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"last_subset": subset, "period": period,
                               "at": datetime.now(tz=UTC).isoformat()}))
    os.replace(tmp, path)


# =====================================================================================
# the drill
# =====================================================================================


def repository_drill(inv: Inventory, name: str, *,
                     choose: Callable[[Sequence[Any]], Any] | None = None,
                     max_files: int = 5) -> DrillResult:
    """Read a rotating subset of repository ``name``'s packs and restore one random
    snapshot byte for byte (see the module docstring)."""
    started = time.monotonic()
    settings = inv.drills.repository
    result = DrillResult("repository", name)
    chooser = choose or (lambda seq: seq[pysecrets.randbelow(len(seq))])
    try:
        inv.repository(name)
        repo = pg_backup.open_repo(inv, name)
        period = settings.read_data_period
        part = next_subset(read_subset_state(inv, name), period)
        subset = f"{part}/{period}"
        logger.info("repository %s: restic check --read-data-subset=%s", name, subset)
        try:
            restic.check(repo, read_data_subset=subset, timeout=6 * 3600)
            result.check(f"check {subset}", True, "packs read and verified, no error")
            write_subset_state(inv, name, part, period)
        except CommandError as exc:
            tail = " | ".join((exc.stderr_tail or str(exc)).splitlines()[-4:])
            result.check(f"check {subset}", False, f"restic check found errors: {tail}")
            result.transient = result.transient or exc.transient
        if settings.restore_random_snapshot:
            _random_restore(inv, repo, result, chooser, max_files=max_files)
        result.rto_s = time.monotonic() - started
    except LabkeeperError as exc:
        result.fail(str(exc), transient=exc.transient)
    result.duration_s = time.monotonic() - started
    logger.info("repository drill %s: %s — %s", name, result.status.upper(),
                result.summary())
    return result


def _random_restore(inv: Inventory, repo: restic.Repo, result: DrillResult,
                    chooser: Callable[[Sequence[Any]], Any], *, max_files: int) -> None:
    snaps = restic.snapshots(repo)
    if not snaps:
        result.notes.append("the repository has no snapshot to restore")
        return
    snap = chooser(snaps)
    sid = snap.short_id or snap.id[:8]
    result.source = f"{sid} ({', '.join(snap.paths)})"
    files = [n for n in restic.ls(repo, snap.id) if n.type == "file"]
    if len(files) > max_files:
        picked: list[restic.LsNode] = []
        pool = list(files)
        while len(picked) < max_files:
            one = chooser(pool)
            pool.remove(one)
            picked.append(one)
        result.notes.append(f"{max_files} of {len(files)} files of {sid} compared")
        files = picked
    workdir = inv.settings.state_dir / "drills" / "restore"
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for node in files:
        digest, size = dump_sha256(repo, snap.id, node.path)
        ok = node.size is None or size == node.size
        detail = f"dump {size} bytes sha256 {digest[:16]}…"
        if not ok:
            detail = f"dump gave {size} bytes, restic recorded {node.size}"
        else:
            digest2, size2 = restore_sha256(repo, snap.id, node.path, workdir)
            if (digest2, size2) != (digest, size):
                ok = False
                detail = (f"restore --verify gave {size2} bytes sha256 {digest2[:16]}…, dump "
                          f"gave {size} bytes sha256 {digest[:16]}…")
            else:
                detail += ", identical through restic restore --verify"
        result.check(f"file {sid}:{node.path}", ok, detail)
        logger.info("%s:%s: %s", sid, node.path, detail)
