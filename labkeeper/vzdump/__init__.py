"""Guest backups with Proxmox's vzdump, without Prefect.

Pure functions decide (which guests, in which order, is this archive good, what
retention would remove, what native job to create); a few thin functions act through
:mod:`labkeeper.proxmox`. A guest counts as backed up only when vzdump said ``OK``
(or ``WARNINGS: n``: success with warnings) *and* the new archive is in the storage
content with the right vmid, a plausible size, the expected format and the notes.

Modules: ``plan`` (selection, per-node queues and slots), ``archive`` (names, log,
verification, results), ``backup`` (one guest's vzdump, retention), ``schedule``
(the per-node scheduler of a run), ``native`` (``/cluster/backup`` jobs).
"""

from labkeeper.vzdump.archive import (
    GuestBackup,
    RetentionResult,
    Row,
    Status,
    VzdumpLog,
    archive_filename,
    archive_time,
    backed_up_since,
    expected_format,
    notes_match,
    parse_log,
    period_start,
    pick_new_archive,
    render_notes,
    verify_archive,
)
from labkeeper.vzdump.backup import (
    apply_retention,
    backup_guest,
    find_archive_path,
    running_vzdump,
)
from labkeeper.vzdump.native import (
    NATIVE_COMMENT,
    NATIVE_PREFIX,
    NativeChange,
    apply_native_plan,
    cron_to_calendar,
    native_job_id,
    native_job_params,
    plan_native_jobs,
)
from labkeeper.vzdump.plan import (
    POLL_FLOOR,
    POLL_FRACTION,
    NodeSlot,
    Resolved,
    Target,
    VerificationFailed,
    VzdumpTimedOut,
    ideal_makespan,
    inventory_vmids,
    job_for,
    node_queues,
    proportional_sleep,
    resolve,
    resolve_selection,
    timeout_seconds,
)
from labkeeper.vzdump.schedule import (
    run_per_node,
)

__all__ = [
    "NATIVE_COMMENT",
    "NATIVE_PREFIX",
    "POLL_FLOOR",
    "POLL_FRACTION",
    "GuestBackup",
    "NativeChange",
    "NodeSlot",
    "Resolved",
    "RetentionResult",
    "Row",
    "Status",
    "Target",
    "VerificationFailed",
    "VzdumpLog",
    "VzdumpTimedOut",
    "apply_native_plan",
    "apply_retention",
    "archive_filename",
    "archive_time",
    "backed_up_since",
    "backup_guest",
    "cron_to_calendar",
    "expected_format",
    "find_archive_path",
    "ideal_makespan",
    "inventory_vmids",
    "job_for",
    "native_job_id",
    "native_job_params",
    "node_queues",
    "notes_match",
    "parse_log",
    "period_start",
    "pick_new_archive",
    "plan_native_jobs",
    "proportional_sleep",
    "render_notes",
    "resolve",
    "resolve_selection",
    "run_per_node",
    "running_vzdump",
    "timeout_seconds",
    "verify_archive",
]
