"""Prefect tasks: thin wrappers that call the core with what a run resolved.

Importing the package makes labkeeper's module loggers part of every run's log.
"""

import prefect  # noqa: F401  (its logging is set up on import)

from labkeeper import log_setup

log_setup.capture_in_prefect_runs()
