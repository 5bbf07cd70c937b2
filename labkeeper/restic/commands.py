"""restic commands run through the one process runner (:func:`run_restic`): the
repository's secrets in restic's environment, failures classified
(:func:`labkeeper.restic.classify_failure`), summaries canonical.

Which binary: ``Repo.binary``, else ``$LABKEEPER_RESTIC``, else ``restic`` on PATH.
Its version is read once per binary (:func:`version_info`, cached by path and
modification time). 0.16+ has ``--retry-lock``: ``forget``, ``prune`` and ``check``
wait for a conflicting lock themselves for :data:`RETRY_LOCK_SECONDS` after our own
:func:`labkeeper.restic.wait_for_locks`.
"""

from __future__ import annotations

import functools
import glob
import os
import shutil
from collections.abc import Mapping, Sequence

from labkeeper import process
from labkeeper.errors import CommandError, ConfigError
from labkeeper.restic.argv import (
    backup_stdin_argv,
    cat_config_argv,
    check_argv,
    dump_argv,
    forget_ids_argv,
    forget_policy_argv,
    init_argv,
    ls_argv,
    prune_argv,
    snapshots_argv,
    snapshots_filter_argv,
    version_argv,
    with_retry_lock,
)
from labkeeper.restic.failures import EXIT_CODES, classify_failure
from labkeeper.restic.models import (
    HEX_ID,
    BackupSummary,
    ForgetGroup,
    LsNode,
    RepoConfig,
    ResticVersion,
    Snapshot,
    is_full_id,
    parse_backup_summary,
    parse_forget,
    parse_ls,
    parse_snapshots,
)
from labkeeper.restic.repository import BINARY_ENV, Repo, default_binary

RETRY_LOCK_SECONDS = 30.0
"""How long maintenance commands let restic (0.16+) retry a conflicting lock itself."""


def run_restic(repo: Repo | None, argv: Sequence[str], *, timeout: float,
               extra_env: Mapping[str, str] | None = None,
               **kwargs: object) -> process.CommandResult:
    """Run a restic command with the repository's secrets in its environment."""
    env = {**(repo.env() if repo else {}), **(extra_env or {})}
    try:
        return process.run(tuple(argv), timeout=timeout, codes=EXIT_CODES, env=env,
                           **kwargs)  # type: ignore[arg-type]
    except CommandError as exc:
        raise classify_failure(exc) from None


def version(*, timeout: float = 15, binary: str | None = None) -> str:
    return str(version_info(binary, timeout=timeout))


def version_info(binary: str | None = None, *, timeout: float = 15) -> ResticVersion:
    """The version of ``binary`` (default :func:`default_binary`), read by running
    ``restic version`` once per binary file (cached by path, inode and mtime, so an
    upgraded binary is read again). Raises :class:`ConfigError` when it is missing."""
    name = binary or default_binary()
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"restic binary {name!r} not found (install restic, or set "
                          f"${BINARY_ENV} to its full path)")
    st = os.stat(path)
    return _version_of(path, st.st_ino, st.st_mtime_ns, timeout)


@functools.lru_cache(maxsize=32)
def _version_of(path: str, _ino: int, _mtime_ns: int, timeout: float) -> ResticVersion:
    return ResticVersion.parse(run_restic(None, version_argv(path), timeout=timeout).stdout)


def repo_version(repo: Repo) -> ResticVersion:
    return version_info(repo.binary)


def full_snapshot_id(repo: Repo, snapshot_id: str, *, timeout: float = 120) -> str:
    """The full 64-hex id of the snapshot ``snapshot_id`` (full or a short prefix)
    names: returned as it is when full, else looked up with ``restic snapshots``."""
    if is_full_id(snapshot_id):
        return snapshot_id
    if not HEX_ID.fullmatch(snapshot_id):
        raise ValueError(f"not a restic snapshot id: {snapshot_id!r}")
    res = run_restic(repo, (*snapshots_argv(repo), snapshot_id), timeout=timeout)
    found = [s.id for s in parse_snapshots(res.stdout) if s.id.startswith(snapshot_id)]
    if len(found) != 1:
        raise CommandError(f"restic: snapshot {snapshot_id} not found (or not unique: "
                           f"{len(found)} match)", argv=res.argv, returncode=0)
    return found[0]


def cached_snapshot_ids(repo: Repo) -> frozenset[str]:
    """The snapshot files in restic's cache of ``repo`` (``<cache>/<repo id>/snapshots/
    <2 hex>/<full id>``): restic writes each snapshot it saves there once the backend
    holds it. Empty without a cache directory."""
    if not repo.cache_dir:
        return frozenset()
    found = glob.glob(os.path.join(glob.escape(repo.cache_dir), "*", "snapshots", "*", "*"))
    return frozenset(n for n in map(os.path.basename, found) if is_full_id(n))


def canonical_summary(repo: Repo, summary: BackupSummary, *, timeout: float = 120,
                      cached_before: frozenset[str] | None = None) -> BackupSummary:
    """``summary`` naming its snapshot by the full id, whatever the restic version.

    restic 0.14 names it by a short id. With ``cached_before`` (:func:`cached_snapshot_ids`
    read before this restic started), the one snapshot file that restic added to the
    cache under that prefix names it (no restic start: ~0.7 s each); else ``restic
    snapshots`` looks it up."""
    if is_full_id(summary.snapshot_id):
        return summary
    short = summary.snapshot_id
    fresh = [] if cached_before is None else \
        [i for i in cached_snapshot_ids(repo) - cached_before if i.startswith(short)]
    full = fresh[0] if len(fresh) == 1 and HEX_ID.fullmatch(short) else \
        full_snapshot_id(repo, short, timeout=timeout)
    return summary.model_copy(update={"snapshot_id": full})


def init(repo: Repo, *, timeout: float = 120) -> None:
    run_restic(repo, init_argv(repo), timeout=timeout)


def snapshots(repo: Repo, *, timeout: float = 120, tags: Sequence[str] = ()) -> list[Snapshot]:
    res = run_restic(repo, snapshots_argv(repo, tags=tags), timeout=timeout)
    return parse_snapshots(res.stdout)


def repo_config(repo: Repo, *, timeout: float = 60) -> RepoConfig:
    res = run_restic(repo, cat_config_argv(repo), timeout=timeout)
    return RepoConfig.model_validate_json(res.stdout)


def find_snapshots(repo: Repo, *, tags: Sequence[str] = (), host: str | None = None,
                   timeout: float = 120) -> list[Snapshot]:
    """Snapshots carrying all of ``tags`` (and of ``host``), oldest first."""
    res = run_restic(repo, snapshots_filter_argv(repo, tags=tags, host=host), timeout=timeout)
    return sorted(parse_snapshots(res.stdout), key=lambda s: s.time)


def retry_lock_for(repo: Repo, seconds: float | None = RETRY_LOCK_SECONDS) -> float | None:
    """``seconds`` when this repository's restic has ``--retry-lock``, else None."""
    return seconds if seconds and repo_version(repo).retry_lock else None


def forget_ids(repo: Repo, ids: Sequence[str], *, timeout: float = 300,
               retry_lock: float | None = RETRY_LOCK_SECONDS) -> None:
    argv = with_retry_lock(forget_ids_argv(repo, ids), retry_lock_for(repo, retry_lock))
    run_restic(repo, argv, timeout=timeout)


def ls(repo: Repo, snapshot_id: str, *, timeout: float = 120) -> list[LsNode]:
    return parse_ls(run_restic(repo, ls_argv(repo, snapshot_id), timeout=timeout).stdout)


def dump_file(repo: Repo, snapshot_id: str, path: str, *, timeout: float = 300) -> str:
    """A (small) file of a snapshot as text: manifests, not dumps."""
    return run_restic(repo, dump_argv(repo, snapshot_id, path), timeout=timeout).stdout


def backup_bytes(repo: Repo, data: bytes, *, filename: str, host: str, tags: Sequence[str],
                 compression: str | None = "auto", timeout: float = 300) -> BackupSummary:
    """Store a small in-memory file (a manifest) as its own ``--stdin`` snapshot."""
    res = run_restic(repo, backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                                             compression=compression),
                     timeout=timeout, input=data)
    return canonical_summary(repo, parse_backup_summary(res.stdout))




def forget_policy(repo: Repo, *, keep: Sequence[str], host: str, tags: Sequence[str],
                  dry_run: bool = False, timeout: float = 600) -> list[ForgetGroup]:
    """Apply a keep policy to one series; returns restic's keep/remove groups."""
    argv = forget_policy_argv(repo, keep=keep, host=host, tags=tags, dry_run=dry_run)
    res = run_restic(repo, with_retry_lock(argv, retry_lock_for(repo)), timeout=timeout)
    return parse_forget(res.stdout)


def prune(repo: Repo, *, dry_run: bool = False, timeout: float = 6 * 3600,
          on_line: process.LineCallback | None = None) -> str:
    """``restic prune``; ``on_line`` gets its output lines (stdout and stderr) as they
    come (restic 0.16+ prints "repo already locked, waiting up to 30s for the lock" on
    stdout while it waits)."""
    argv = with_retry_lock(prune_argv(repo, dry_run=dry_run), retry_lock_for(repo))
    return run_restic(repo, argv, timeout=timeout, on_stdout_line=on_line,
                      on_stderr_line=on_line).stdout


def check(repo: Repo, *, read_data_subset: str | None = None,
          timeout: float = 6 * 3600) -> str:
    argv = with_retry_lock(check_argv(repo, read_data_subset=read_data_subset),
                           retry_lock_for(repo))
    return run_restic(repo, argv, timeout=timeout).stdout


def forget_tagged(repo: Repo, tag: str, *, host: str, timeout: float) -> list[Snapshot]:
    """Forget every snapshot of ``host`` carrying ``tag`` (a failed attempt's
    ``backup:<id>``); returns them (none: nothing to forget)."""
    leftovers = find_snapshots(repo, tags=[tag], host=host, timeout=timeout)
    if leftovers:
        forget_ids(repo, [s.id for s in leftovers], timeout=timeout)
    return leftovers
