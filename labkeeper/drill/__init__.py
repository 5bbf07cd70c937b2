"""Disaster-recovery drills: restore for real, verify, measure RTO and RPO.

No Prefect here. Each drill returns a :class:`DrillResult` and never raises for a
drill that *failed*: the result says what failed and why; only an error that may go
away on retry (a repository backend that is down) is marked ``transient``.

- :mod:`~labkeeper.drill.database`: latest dump → scratch database, verified, dropped
  (the streamed restore itself: :mod:`~labkeeper.drill.pgrestore`);
- :mod:`~labkeeper.drill.guest`: latest vzdump archive → isolated scratch guest, up?
  (marking and sweeping copies: :mod:`~labkeeper.drill.scratch`; ssh / probe checks:
  :mod:`~labkeeper.drill.reach`);
- :mod:`~labkeeper.drill.repository`: rotating ``restic check`` subset and one random
  snapshot restored byte for byte (:mod:`~labkeeper.drill.hashing`);
- :mod:`~labkeeper.drill.paths`: a sample of a path set compared with the host;
- :mod:`~labkeeper.drill.plan`: which drills a target means;
- :mod:`~labkeeper.drill.result`: the result, its checks and objectives.
"""

from labkeeper.drill.database import (
    create_db_sql,
    database_drill,
    drill_conn,
    drop_db_sql,
    is_scratch_db,
    scratch_db_name,
)
from labkeeper.drill.guest import (
    guest_drill,
    isolate_network,
    newest_archive,
    pick_scratch_vmid,
    scratch_restore_request,
)
from labkeeper.drill.hashing import dump_sha256, restore_argv, restore_sha256, sha256_argv
from labkeeper.drill.pgrestore import (
    PG_RESTORE_CODES,
    RestoreOutcome,
    compare_tables,
    judge_smoke,
    pg_restore_argv,
    psql_restore_argv,
    restore_errors,
    restored_counts,
    stream_restore,
)
from labkeeper.drill.plan import KINDS, find_path_set, path_set_target, plan_targets
from labkeeper.drill.reach import check_label, copy_ssh_target, reach_problem
from labkeeper.drill.repository import (
    next_subset,
    read_subset_state,
    repository_drill,
    write_subset_state,
)
from labkeeper.drill.result import (
    STALL_TIMEOUT,
    Check,
    DrillFailed,
    DrillResult,
    objective_checks,
)
from labkeeper.drill.scratch import (
    KEPT_TAG,
    SCRATCH_TAG,
    SweepDecision,
    marker_created,
    scratch_description,
    scratch_restore_options,
    sweep_decision,
    sweep_scratch,
)

__all__ = [
    "KEPT_TAG",
    "KINDS",
    "PG_RESTORE_CODES",
    "SCRATCH_TAG",
    "STALL_TIMEOUT",
    "Check",
    "DrillFailed",
    "DrillResult",
    "RestoreOutcome",
    "SweepDecision",
    "check_label",
    "compare_tables",
    "copy_ssh_target",
    "create_db_sql",
    "database_drill",
    "drill_conn",
    "drop_db_sql",
    "dump_sha256",
    "find_path_set",
    "guest_drill",
    "is_scratch_db",
    "isolate_network",
    "judge_smoke",
    "marker_created",
    "newest_archive",
    "next_subset",
    "objective_checks",
    "path_set_target",
    "pg_restore_argv",
    "pick_scratch_vmid",
    "plan_targets",
    "psql_restore_argv",
    "reach_problem",
    "read_subset_state",
    "repository_drill",
    "restore_argv",
    "restore_errors",
    "restore_sha256",
    "restored_counts",
    "scratch_db_name",
    "scratch_description",
    "scratch_restore_options",
    "scratch_restore_request",
    "sha256_argv",
    "stream_restore",
    "sweep_decision",
    "sweep_scratch",
    "write_subset_state",
]
