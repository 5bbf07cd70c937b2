"""Prefect flows: each reads like the runbook a person follows.

Importing the package makes labkeeper's module loggers part of every run's log, a
run's end stop its heartbeat thread at once (flows/heartbeat.py), and Prefect's clients
share one TLS context while the API is plain http (flows/prefect_tls.py).
"""

import os

from labkeeper import log_setup

log_setup.prefect_environment(os.environ)  # read by Prefect's import, if it comes first

import prefect  # noqa: E402, F401  (its logging is set up on import)

log_setup.capture_in_prefect_runs()

from flows import heartbeat, prefect_tls  # noqa: E402

heartbeat.install()
prefect_tls.install()
