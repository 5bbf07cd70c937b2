"""Pure argv builders for every restic command labkeeper runs, on this machine or on
a backup host over SSH (``binary=``: that host's restic). Argv never holds a secret:
those travel in the environment (:meth:`labkeeper.restic.Repo.env`).
"""

from __future__ import annotations

from collections.abc import Sequence

from labkeeper.restic.repository import Repo, default_binary

SNAPSHOT_TAG_SEPARATOR = ","


def check_tag(tag: str) -> str:
    """A restic tag may not contain ',' (restic splits ``--tag a,b``) or whitespace."""
    if not tag or "," in tag or any(c.isspace() for c in tag):
        raise ValueError(f"not a usable restic tag: {tag!r}")
    return tag


def _tag_options(tags: Sequence[str]) -> tuple[str, ...]:
    argv: tuple[str, ...] = ()
    for t in tags:
        argv += ("--tag", check_tag(t))
    return argv


def version_argv(binary: str | None = None) -> tuple[str, ...]:
    return (binary or default_binary(), "version")


def init_argv(repo: Repo, *, compression: bool = True) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "init", "--json")
    if compression:
        argv += ("--repository-version", "2")
    return argv


def snapshots_argv(repo: Repo, *, tags: Sequence[str] = (), host: str | None = None,
                   paths: Sequence[str] = ()) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "snapshots", "--json", "--no-lock")
    for t in tags:
        argv += ("--tag", t)
    if host:
        argv += ("--host", host)
    for p in paths:
        argv += ("--path", p)
    return argv


def snapshots_filter_argv(repo: Repo, *, tags: Sequence[str] = (), host: str | None = None
                          ) -> tuple[str, ...]:
    """``restic snapshots`` keeping only snapshots that carry *all* of ``tags``."""
    argv = (*repo.base_argv(), "snapshots", "--json", "--no-lock")
    if tags:
        argv += ("--tag", SNAPSHOT_TAG_SEPARATOR.join(check_tag(t) for t in tags))
    if host:
        argv += ("--host", host)
    return argv


def cat_config_argv(repo: Repo) -> tuple[str, ...]:
    return (*repo.base_argv(), "cat", "config", "--no-lock")


def with_retry_lock(argv: Sequence[str], seconds: float | None) -> tuple[str, ...]:
    """``argv`` with restic's global ``--retry-lock <s>s`` after the binary (restic
    0.16+); unchanged when ``seconds`` is None or 0."""
    argv = tuple(argv)
    if not seconds:
        return argv
    return (argv[0], "--retry-lock", f"{max(1, round(seconds))}s", *argv[1:])


def backup_stdin_argv(repo: Repo, *, filename: str, host: str, tags: Sequence[str],
                      compression: str | None = "auto") -> tuple[str, ...]:
    """``restic backup --stdin``: the stream becomes one file ``/<filename>``."""
    if "/" in filename or not filename:
        raise ValueError(f"stdin filename must be a plain file name, got {filename!r}")
    argv = (*repo.base_argv(),)
    if compression:
        argv += ("--compression", compression)
    argv += ("backup", "--stdin", "--stdin-filename", filename, "--host", host, "--json")
    return argv + _tag_options(tags)


def backup_paths_argv(repo: Repo, *, paths: Sequence[object], host: str, tags: Sequence[str],
                      excludes: Sequence[object] = (), exclude_caches: bool = False,
                      one_file_system: bool = False, compression: str | None = "auto",
                      binary: str | None = None) -> tuple[str, ...]:
    """``restic backup --json`` of files (paths after ``--``, so a path can never be
    read as an option); ``binary``: the restic of the host that holds them."""
    argv = repo.base_argv(binary)
    if compression:
        argv += ("--compression", compression)
    argv += ("backup", "--json", "--host", host, *_tag_options(tags))
    for pattern in excludes:
        argv += ("--exclude", str(pattern))
    if exclude_caches:
        argv += ("--exclude-caches",)
    if one_file_system:
        argv += ("--one-file-system",)
    return (*argv, "--", *(str(p) for p in paths))


def forget_ids_argv(repo: Repo, ids: Sequence[str]) -> tuple[str, ...]:
    if not ids:
        raise ValueError("forget needs at least one snapshot id")
    return (*repo.base_argv(), "forget", *ids)


def forget_policy_argv(repo: Repo, *, keep: Sequence[str], host: str, tags: Sequence[str],
                       dry_run: bool = False) -> tuple[str, ...]:
    """``restic forget`` of one series: the snapshots of ``host`` carrying all ``tags``
    form one group (``--group-by host``), whatever their per-run tags or paths."""
    if not keep:
        raise ValueError("a forget policy must keep something")
    argv = (*repo.base_argv(), "forget", "--json", "--host", host,
            "--tag", SNAPSHOT_TAG_SEPARATOR.join(check_tag(t) for t in tags),
            "--group-by", "host", *keep)
    if dry_run:
        argv += ("--dry-run",)
    return argv


def prune_argv(repo: Repo, *, dry_run: bool = False) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "prune")
    if dry_run:
        argv += ("--dry-run",)
    return argv


def check_argv(repo: Repo, *, read_data_subset: str | None = None) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "check")
    if read_data_subset:
        argv += (f"--read-data-subset={read_data_subset}",)
    return argv


def list_locks_argv(repo: Repo) -> tuple[str, ...]:
    return (*repo.base_argv(), "list", "locks", "--no-lock")


def cat_lock_argv(repo: Repo, lock_id: str) -> tuple[str, ...]:
    return (*repo.base_argv(), "cat", "lock", lock_id, "--no-lock")


def unlock_argv(repo: Repo, *, binary: str | None = None) -> tuple[str, ...]:
    """Removes *stale* locks only (never ``--remove-all``); ``binary``: the restic of
    the host that took them (restic removes a dead process's lock only there)."""
    return (*repo.base_argv(binary), "unlock")


def ls_argv(repo: Repo, snapshot_id: str) -> tuple[str, ...]:
    return (*repo.base_argv(), "ls", "--json", "--no-lock", snapshot_id)


def dump_argv(repo: Repo, snapshot_id: str, path: str) -> tuple[str, ...]:
    return (*repo.base_argv(), "dump", "--no-lock", snapshot_id, path)
