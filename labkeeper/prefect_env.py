"""What Prefect must find in the environment before it is imported: ``labkeeper`` among
its extra loggers (so labkeeper's records reach each run's log) and no warning for a
record outside any run. Standard library only: the thin command-line client
(cli/runner_client.py) sets it before handing a command to the warm runner, and must not
pay for importing ``logging`` (≈10 ms of every command's start)."""

from __future__ import annotations

from collections.abc import MutableMapping

ROOT = "labkeeper"
EXTRA_LOGGERS = "PREFECT_LOGGING_EXTRA_LOGGERS"
# a record from a thread outside any run (the WAL receivers under `serve`) still goes
# to the console; Prefect must not warn that it has no run to send it to
WHEN_MISSING_RUN = "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"


def prefect_environment(environ: MutableMapping[str, str]) -> None:
    """Name ``labkeeper`` among Prefect's extra loggers in ``environ`` (kept if set).

    Called on ``os.environ`` before Prefect is imported, so this process and every
    flow-run process it starts (workers, ``serve``) send labkeeper's records to the run.
    """
    names = [n.strip() for n in environ.get(EXTRA_LOGGERS, "").split(",") if n.strip()]
    if ROOT not in names:
        environ[EXTRA_LOGGERS] = ",".join([*names, ROOT])
    environ.setdefault(WHEN_MISSING_RUN, "ignore")
