"""What every labkeeper task shares: retry only transient errors, with backoff.

(``failure_of`` lives in :mod:`labkeeper.run_report`; flows import it from here too.)
"""

from __future__ import annotations

import logging
import os
from typing import Any

from prefect.tasks import exponential_backoff

from labkeeper.errors import PicklableError, is_transient
from labkeeper.run_report import failure_of
from labkeeper.secrets import install_redaction

__all__ = ["RETRY", "RunFailed", "failure_of", "lab_path", "retry_if_transient"]

install_redaction()


class _ThreadTimeoutNotice(logging.Filter):
    """Drop Prefect's per-run notice that sync task timeouts cannot interrupt a thread.

    labkeeper's tasks never rely on that: every subprocess, SSH command and API
    call inside them has its own deadline (the runners require one), and the
    task ``timeout_seconds`` is only the outer bound.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in str(record.msg)


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNotice())


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry timeouts, resets and locks; never bad config."""
    return is_transient(failure_of(state))


RETRY = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}
"""Keyword arguments for ``@task`` giving labkeeper's retry policy (2, 4, 8 s ± jitter)."""


def lab_path(lab: str | None) -> str:
    """The inventory a flow run uses: its ``lab`` parameter, else ``$LABKEEPER_LAB``,
    else ``lab.yaml`` in the working directory. (A path, never a secret.)"""
    return lab or os.environ.get("LABKEEPER_LAB") or "lab.yaml"


class RunFailed(PicklableError):
    """A flow run failed after trying everything; ``rows`` holds its whole result table
    (so the CLI and the UI can still show what succeeded). Picklable with its rows."""

    def __init__(self, message: str, rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.rows = rows or []
