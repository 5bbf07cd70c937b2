"""restic, run through the process runner on every version from 0.14 (Debian 12) to
0.18 (Debian 13): where a repository is and how it opens (:mod:`.repository`), pure
argv builders for this machine and for backup hosts (:mod:`.argv`), tolerant models
of its JSON (:mod:`.models`), what its failures mean (:mod:`.failures`), the commands
(:mod:`.commands`), locks (:mod:`.locks`) and stdin backups that own end-of-stream
(:mod:`.streaming`).

Secrets reach restic only through its environment (``RESTIC_PASSWORD``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), never argv. Every name is
importable from here: ``from labkeeper import restic; restic.stream_backup(...)``.
"""

from labkeeper.restic import argv, commands, failures, locks, models, repository, streaming
from labkeeper.restic.argv import (
    SNAPSHOT_TAG_SEPARATOR,
    backup_paths_argv,
    backup_stdin_argv,
    cat_config_argv,
    cat_lock_argv,
    check_argv,
    check_tag,
    dump_argv,
    forget_ids_argv,
    forget_policy_argv,
    init_argv,
    list_locks_argv,
    ls_argv,
    prune_argv,
    snapshots_argv,
    snapshots_filter_argv,
    unlock_argv,
    version_argv,
    with_retry_lock,
)
from labkeeper.restic.commands import (
    RETRY_LOCK_SECONDS,
    backup_bytes,
    canonical_summary,
    check,
    dump_file,
    find_snapshots,
    forget_ids,
    forget_policy,
    forget_tagged,
    full_snapshot_id,
    init,
    ls,
    prune,
    repo_config,
    repo_version,
    retry_lock_for,
    run_restic,
    snapshots,
    version,
    version_info,
)
from labkeeper.restic.failures import (
    EXIT_CODES,
    LOCK_FAILED,
    backend_retry,
    classify_failure,
    exit_error_message,
)
from labkeeper.restic.locks import (
    CAT_LOCK_TIMEOUT,
    LockSite,
    describe_lock,
    list_locks,
    local_site,
    lock_is_stale,
    note_blocking,
    pid_alive,
    remove_stale,
    settle_locks,
    unlock,
    wait_for_locks,
)
from labkeeper.restic.models import (
    BackupSummary,
    ErrorMessage,
    ForgetGroup,
    LockInfo,
    LsNode,
    Message,
    RepoConfig,
    ResticVersion,
    Snapshot,
    StatusMessage,
    SummaryMessage,
    is_full_id,
    parse_backup_summary,
    parse_forget,
    parse_lock,
    parse_ls,
    parse_message,
    parse_snapshots,
    parse_version,
    same_id,
    short_id,
    stdin_summary_problem,
)
from labkeeper.restic.repository import (
    BINARY_ENV,
    RESTIC,
    Repo,
    default_binary,
    open_repo,
    repo_cache_dir,
    repo_for,
)
from labkeeper.restic.streaming import (
    TAIL_BYTES,
    EarlyBackup,
    Gate,
    PendingBackup,
    StreamFailed,
    StreamResult,
    start_backup_early,
    stream_backup,
)

__all__ = [
    "BINARY_ENV", "CAT_LOCK_TIMEOUT", "EXIT_CODES", "LOCK_FAILED", "RESTIC",
    "RETRY_LOCK_SECONDS", "SNAPSHOT_TAG_SEPARATOR", "TAIL_BYTES", "BackupSummary",
    "EarlyBackup", "ErrorMessage", "ForgetGroup", "Gate", "LockInfo", "LockSite", "LsNode",
    "Message", "PendingBackup", "Repo", "RepoConfig", "ResticVersion", "Snapshot",
    "StatusMessage", "StreamFailed", "StreamResult", "SummaryMessage", "argv",
    "backend_retry", "backup_bytes", "backup_paths_argv", "backup_stdin_argv",
    "canonical_summary", "cat_config_argv", "cat_lock_argv", "check", "check_argv",
    "check_tag", "classify_failure", "commands", "default_binary", "describe_lock",
    "dump_argv", "dump_file", "exit_error_message", "failures", "find_snapshots",
    "forget_ids", "forget_ids_argv", "forget_policy", "forget_policy_argv", "forget_tagged",
    "full_snapshot_id", "init", "init_argv", "is_full_id", "list_locks", "list_locks_argv",
    "local_site", "lock_is_stale", "locks", "ls", "ls_argv", "models", "note_blocking",
    "open_repo", "parse_backup_summary", "parse_forget", "parse_lock", "parse_ls",
    "parse_message", "parse_snapshots", "parse_version", "pid_alive", "prune", "prune_argv",
    "remove_stale", "repo_cache_dir", "repo_config", "repo_for", "repo_version",
    "repository", "retry_lock_for", "run_restic", "same_id", "settle_locks", "short_id",
    "snapshots", "snapshots_argv", "snapshots_filter_argv", "start_backup_early",
    "stdin_summary_problem", "stream_backup", "streaming", "unlock", "unlock_argv",
    "version", "version_argv", "version_info", "wait_for_locks", "with_retry_lock",
]
