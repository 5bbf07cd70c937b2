"""File backups: restic running *on the host that holds the files*, driven over SSH.

One path set (``photos`` on ``nas``) is backed up by :func:`backup_path_set`
(:mod:`.run`): restic on the host (:mod:`.remote`: argv, secrets on the SSH
channel's stdin, sudo, version, locks, the attempt's processes), its progress and
unreadable paths (:mod:`.progress`), the result and errors (:mod:`.results`), and
nothing half-done surviving a failure (:mod:`.cleanup`, pending cleanups swept by the
next backup).

Snapshots: ``--host <lab name>`` and the stable tags ``labkeeper``,
``paths:<host>/<set>``, ``kind:paths`` (a *series*, like a database's
``db:<server>/<name>``, see :func:`retention_series`), plus the per-attempt
``backup:<id>``.
"""

from labkeeper.errors import ConfigError, PermanentError
from labkeeper.path_backup import cleanup, progress, remote, results, run
from labkeeper.path_backup.cleanup import (
    CLEANUP_TIMEOUT,
    PENDING_DIR,
    PendingCleanups,
    discard_attempt,
    dump_pending,
    load_pending,
    pending_owner,
    pending_path,
    sweep_pending,
)
from labkeeper.path_backup.progress import (
    UNREADABLE_KEEP,
    ErrorCollector,
    ProgressThrottle,
    Unreadable,
    format_progress,
    human_bytes,
    human_duration,
    shorten_path,
)
from labkeeper.path_backup.remote import (
    ATTEMPT_PIDS_SCRIPT,
    INSTALL_HINT,
    MIN_RESTIC,
    STOP_GRACE,
    SUDOERS_ENV,
    Remote,
    attempt_pids,
    attempt_pids_argv,
    backup_argv,
    check_version,
    handle_locks,
    host_repo,
    parse_pids,
    parse_version_tuple,
    progress_fps,
    remote_env,
    remote_hostname,
    remote_pid_alive,
    stop_attempt,
    sudo_restic,
    sudo_wrap,
)
from labkeeper.path_backup.results import (
    AttemptStillRunning,
    PathBackupFailed,
    PathBackupResult,
    ResticMissing,
    backup_tag,
    iter_unreadable_lines,
    new_backup_id,
    series_label,
    series_tags,
)
from labkeeper.path_backup.run import (
    backup_path_set,
    open_repo,
    retention_series,
    select_path_sets,
    ssh_target_for,
)
from labkeeper.pending import PendingAttempt, new_pending, with_pending, without_pending
from labkeeper.restic import (
    ErrorMessage,
    Message,
    StatusMessage,
    SummaryMessage,
    parse_message,
)

__all__ = [
    "ATTEMPT_PIDS_SCRIPT", "CLEANUP_TIMEOUT", "INSTALL_HINT", "MIN_RESTIC", "PENDING_DIR",
    "STOP_GRACE", "SUDOERS_ENV", "UNREADABLE_KEEP", "AttemptStillRunning", "ConfigError",
    "ErrorCollector", "ErrorMessage", "Message", "PathBackupFailed", "PathBackupResult",
    "PendingAttempt", "PendingCleanups", "PermanentError", "ProgressThrottle", "Remote",
    "ResticMissing", "StatusMessage", "SummaryMessage", "Unreadable", "attempt_pids",
    "attempt_pids_argv", "backup_argv", "backup_path_set", "backup_tag", "check_version",
    "cleanup", "discard_attempt", "dump_pending", "format_progress", "handle_locks",
    "host_repo", "human_bytes", "human_duration", "iter_unreadable_lines", "load_pending",
    "new_backup_id", "new_pending", "open_repo", "parse_message", "parse_pids",
    "parse_version_tuple", "pending_owner", "pending_path", "progress", "progress_fps",
    "remote", "remote_env", "remote_hostname", "remote_pid_alive", "results",
    "retention_series", "run", "select_path_sets", "series_label", "series_tags",
    "shorten_path", "ssh_target_for", "stop_attempt", "sudo_restic", "sudo_wrap",
    "sweep_pending", "with_pending", "without_pending",
]
