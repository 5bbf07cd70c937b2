"""Where labkeeper's records go: Prefect's extra loggers, the command line's stderr."""

from __future__ import annotations

import io
import logging

import pytest

from labkeeper import log_setup


def test_prefect_environment_adds_labkeeper_to_extra_loggers_and_keeps_the_users():
    env = {"PREFECT_LOGGING_EXTRA_LOGGERS": "dask, myapp"}
    log_setup.prefect_environment(env)
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "dask,myapp,labkeeper"
    assert env["PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW"] == "ignore"
    log_setup.prefect_environment(env)  # idempotent
    assert env["PREFECT_LOGGING_EXTRA_LOGGERS"] == "dask,myapp,labkeeper"


def test_prefect_environment_on_an_empty_environment_names_labkeeper_only():
    env: dict[str, str] = {"PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "warn"}
    log_setup.prefect_environment(env)
    assert env == {"PREFECT_LOGGING_EXTRA_LOGGERS": "labkeeper",
                   "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "warn"}


@pytest.mark.parametrize(("value", "expected"), [("debug", logging.DEBUG), ("WARNING", 30),
                                                 ("nonsense", logging.INFO)])
def test_level_reads_labkeeper_log_level(monkeypatch, value, expected):
    monkeypatch.setenv("LABKEEPER_LOG_LEVEL", value)
    assert log_setup.level() == expected


def test_print_to_stderr_prints_plain_lines_once_however_often_it_is_called(monkeypatch):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [h for h in root.handlers  # no Prefect console
                                           if type(h).__name__ != "PrefectConsoleHandler"])
    logger = logging.getLogger("labkeeper")
    before = list(logger.handlers)
    logger.handlers[:] = []
    out = io.StringIO()
    try:
        handler = log_setup.print_to_stderr(out)
        assert log_setup.print_to_stderr(out) is handler
        logging.getLogger("labkeeper.some.module").info("snapshot %s saved", "ab12")
        assert out.getvalue() == "snapshot ab12 saved\n"
    finally:
        logger.handlers[:] = before


def test_print_to_stderr_stays_quiet_while_prefects_console_prints_the_root(monkeypatch):
    class PrefectConsoleHandler(logging.Handler):  # stands in by name, as the check reads
        def __init__(self) -> None:
            super().__init__()
            self.records: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record.getMessage())

    logger = logging.getLogger("labkeeper")
    before = list(logger.handlers)
    logger.handlers[:] = []
    out = io.StringIO()
    console = PrefectConsoleHandler()
    logging.getLogger().addHandler(console)
    try:
        log_setup.print_to_stderr(out)
        logging.getLogger("labkeeper.x").info("once only")
        assert out.getvalue() == ""
        assert console.records == ["once only"]
    finally:
        logging.getLogger().removeHandler(console)
        logger.handlers[:] = before


def test_in_context_runs_the_target_with_the_callers_context_variables():
    import contextvars
    import threading

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("the run")
    seen: list[str] = []
    th = threading.Thread(target=log_setup.in_context(lambda: seen.append(var.get())))
    th.start()
    th.join()
    plain: list[str] = []
    th = threading.Thread(target=lambda: plain.append(var.get()))
    th.start()
    th.join()
    assert seen == ["the run"]
    assert plain == ["unset"]
