"""Where labkeeper's log records go: module loggers under ``labkeeper``, nothing else.

Core modules log with ``logging.getLogger(__name__)``; they never receive a print
function. In a flow-run process the ``labkeeper`` logger is one of Prefect's extra
loggers (``PREFECT_LOGGING_EXTRA_LOGGERS``), so each record lands in the run's log in
the UI; `capture_in_prefect_runs` makes that hold even where the setting was not in
the environment when Prefect was imported. The command line prints the records
itself (`print_to_stderr`) unless Prefect's console handler already does.
A thread the core starts runs its target in a copy of the caller's context
(`in_context`), so its records keep the flow run they belong to.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from labkeeper.prefect_env import (  # noqa: F401  (their home; names kept here)
    EXTRA_LOGGERS,
    ROOT,
    WHEN_MISSING_RUN,
    prefect_environment,
)

LEVEL_ENV = "LABKEEPER_LOG_LEVEL"


def level() -> int:
    """The level labkeeper logs at: ``LABKEEPER_LOG_LEVEL`` (a name), INFO by default."""
    value = logging.getLevelName(os.environ.get(LEVEL_ENV, "INFO").strip().upper())
    return value if isinstance(value, int) else logging.INFO


def capture_in_prefect_runs() -> logging.Logger:
    """Give the ``labkeeper`` logger the handlers of Prefect's ``prefect.extra``.

    What Prefect's extra-loggers setting does at import, done again idempotently (a
    handler already there is not added twice). Call after ``import prefect``.
    """
    logger = logging.getLogger(ROOT)
    logger.setLevel(level())
    for handler in logging.getLogger("prefect.extra").handlers:
        if handler not in logger.handlers:
            logger.addHandler(handler)
    return logger


class _ConsoleHandler(logging.StreamHandler):
    """Message-only lines on stderr, quiet while Prefect's console prints the root's.

    Without a fixed stream it writes to whatever ``sys.stderr`` is at the moment (a
    test runner's capture included).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream if stream is not None else sys.stderr)
        self._follow = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if _prefect_console_on_root():
            return
        if self._follow:
            self.stream = sys.stderr
        super().emit(record)


def _prefect_console_on_root() -> bool:
    return any(type(h).__name__ == "PrefectConsoleHandler" for h in logging.getLogger().handlers)


def print_to_stderr(stream: TextIO | None = None) -> logging.Handler:
    """Print labkeeper's records as plain lines (the command line's output)."""
    logger = logging.getLogger(ROOT)
    logger.setLevel(level())
    for handler in logger.handlers:
        if isinstance(handler, _ConsoleHandler):
            return handler
    handler = _ConsoleHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    return handler


def in_context(target: Callable[..., Any]) -> Callable[..., Any]:
    """``target`` run in a copy of the current context (for ``threading.Thread``)."""
    ctx = contextvars.copy_context()

    def run(*args: Any, **kwargs: Any) -> Any:
        return ctx.run(target, *args, **kwargs)

    return run
