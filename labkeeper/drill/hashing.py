"""A file of a restic snapshot, hashed byte for byte two ways: as ``restic dump`` streams it
and as ``restic restore --verify`` writes it. Used by the repository and paths drills.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from labkeeper import process, restic
from labkeeper.drill.result import STALL_TIMEOUT
from labkeeper.errors import CommandError, LabkeeperError


def restore_argv(repo: restic.Repo, snapshot_id: str, target: str,
                 include: str) -> tuple[str, ...]:
    """``restic restore`` of one path of a snapshot, reading back what it wrote."""
    return (*repo.base_argv(), "restore", "--no-lock", snapshot_id, "--target", target,
            "--include", include, "--verify")


def sha256_argv() -> tuple[str, ...]:
    return ("sha256sum", "-b", "-")


def dump_sha256(repo: restic.Repo, snapshot_id: str, path: str, *,
                timeout: float = 3600) -> tuple[str, int]:
    """sha256 and length of one file as ``restic dump`` streams it."""
    res = process.pipeline(
        [process.Stage(restic.dump_argv(repo, snapshot_id, path), codes=restic.EXIT_CODES,
                       env=repo.env()),
         process.Stage(sha256_argv())],
        timeout=timeout, stall_timeout=STALL_TIMEOUT, check=False)
    if not res.ok:
        idx = res.cause if res.cause is not None else 0
        err = process.make_error(res.stages[idx])
        if idx == 0:
            err = restic.classify_failure(err)
        raise LabkeeperError(f"restic dump {snapshot_id[:8]}:{path}: {err}",
                             transient=err.transient)
    return res.stdout.split()[0], res.bytes_relayed[0]


def restore_sha256(repo: restic.Repo, snapshot_id: str, path: str, workdir: Path, *,
                   timeout: float = 3600) -> tuple[str, int]:
    """sha256 and length of one file restored by ``restic restore --verify``."""
    target = Path(tempfile.mkdtemp(prefix="restore-", dir=workdir))
    try:
        try:
            restic.run_restic(repo, restore_argv(repo, snapshot_id, str(target), path),
                              timeout=timeout)
        except CommandError as exc:
            raise LabkeeperError(f"restic restore {snapshot_id[:8]}:{path}: {exc}",
                                 transient=exc.transient) from None
        restored = target / path.lstrip("/")
        h = hashlib.sha256()
        n = 0
        with open(restored, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n
    finally:
        shutil.rmtree(target, ignore_errors=True)
