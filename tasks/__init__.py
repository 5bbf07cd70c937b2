"""Prefect tasks: thin wrappers that call the core with what a run resolved.

Importing the package makes labkeeper's module loggers part of every run's log.
"""

import os

from labkeeper import log_setup

log_setup.prefect_environment(os.environ)  # read by Prefect's import, if it comes first

import prefect  # noqa: E402, F401  (its logging is set up on import)

log_setup.capture_in_prefect_runs()
