"""The `labkeeper` entry point (the console script and ``python -m cli.main``).

A flow command (``backup run``, ``paths run``, ``drill run``, ...) is first handed to
the warm runner (cli/runner_client.py, cli/runner.py), which has Prefect and the flows
imported already; without one, or with ``LABKEEPER_NO_RUNNER=1``, the command runs in
this process (`run_in_process`). This module imports only the standard library at
start-up so the hand-over stays cheap; the typer app lives in cli/app.py, and
``from cli.main import app`` (or any other name of it) still works.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any


def prepare_environment(environ: MutableMapping[str, str]) -> None:
    """Before any Prefect import reads its settings. The installed command (whatever its
    entry point) switches Prefect's analytics off unless the user set them: an offline
    lab's server must not log "Failed to send telemetry" on every run. labkeeper's
    module loggers reach each run's log in the UI (Prefect's extra loggers), here and in
    every flow-run process this one starts (`serve`)."""
    from labkeeper import prefect_env  # stdlib only: the thin client stays cheap

    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    prefect_env.prefect_environment(environ)


prepare_environment(os.environ)  # at import: whatever imports Prefect next reads it


# Commands that run flows (None: every sub-command). Without a configured Prefect server
# they use the local one, starting it once if needed; `status` only reads the history.
_FLOW_COMMANDS: dict[str, frozenset[str] | None] = {
    "doctor": None, "update": None, "serve": None, "provision": frozenset({"apply"}),
    "vzdump": frozenset({"run"}), "backup": frozenset({"run"}),
    "repo": frozenset({"maintain"}), "paths": frozenset({"run"}),
    "drill": frozenset({"run"}), "runbook": frozenset({"run", "approve"}),
}


def prefect_for_command(argv: list[str], environ: MutableMapping[str, str]) -> str | None:
    """Before a flow is imported: point Prefect at the configured server, else at the
    local one (labkeeper/local_server.py). Returns what was done, None for commands
    that need no server."""
    if not argv or {"--help", "-h"} & set(argv) or (argv[0] == "serve"
                                                   and "--schedules" in argv):
        return None
    from labkeeper import local_server as ls

    if argv[0] == "status":
        return ls.use_for_command(environ, start_if_needed=False)
    if argv[0] not in _FLOW_COMMANDS:
        return None
    subs = _FLOW_COMMANDS[argv[0]]
    if subs is not None and (len(argv) < 2 or argv[1] not in subs):
        return None
    return ls.use_for_command(environ)


def runs_a_flow(argv: list[str]) -> bool:
    """A command the warm runner may run: one of _FLOW_COMMANDS (not `serve`, which
    keeps running; not `--help`)."""
    if not argv or {"--help", "-h"} & set(argv) or argv[0] not in _FLOW_COMMANDS \
            or argv[0] == "serve":
        return False
    subs = _FLOW_COMMANDS[argv[0]]
    return subs is None or (len(argv) >= 2 and argv[1] in subs)


def _exit_code(code: object) -> int:
    """What the interpreter makes of ``SystemExit(code)``."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def run_in_process(args: list[str], before_app: Callable[[], None] | None = None) -> int:
    """Run ``labkeeper <args>`` in this process; its exit code. ``before_app`` runs once
    the Prefect server is chosen (the warm runner rebuilds Prefect's settings there)."""
    prepare_environment(os.environ)
    from labkeeper import log_setup
    from labkeeper.errors import LabkeeperError

    log_setup.print_to_stderr()  # the local server's start is reported, too
    try:
        prefect_for_command(args, os.environ)
    except (LabkeeperError, OSError) as exc:  # no server would start: say why, run nothing
        print(f"labkeeper: {exc}", file=sys.stderr)
        return 2
    if before_app is not None:
        before_app()
    from cli.app import app

    try:
        app(args=args)
    except SystemExit as exc:
        return _exit_code(exc.code)
    return 0


def main() -> None:  # pragma: no cover
    if runs_a_flow(sys.argv[1:]):
        from cli import runner_client

        code = runner_client.run(sys.argv)
        if code is not None:
            raise SystemExit(code)
    code = run_in_process(sys.argv[1:])
    import gc

    gc.freeze()  # the interpreter's teardown need not walk every object (~0.3 s)
    raise SystemExit(code)


def __getattr__(name: str) -> Any:
    """The typer app and the other names of the command line, from cli/app.py."""
    if name.startswith("__"):
        raise AttributeError(name)
    import cli.app

    try:
        return getattr(cli.app, name)
    except AttributeError:
        raise AttributeError(f"module 'cli.main' has no attribute {name!r}") from None


if __name__ == "__main__":  # pragma: no cover
    main()
