"""A flow run's report: result rows into a table artifact, a markdown summary, events and
metrics — what a person reads in the Prefect UI and what monitoring scrapes.

:class:`RunReport` holds the machinery every job shares (artifact keys ``<key>`` and
``<key>-summary``, ``labkeeper.*`` events on ``labkeeper.<kind>.<id>`` resources,
metric samples recorded once at the end); the job modules beside it
(``backups``, ``drill``, ``vzdump``, ``update``, ``doctor``, ``provision``) say what
each job's rows, events, metrics and summary hold. Flows call them, so a flow reads
as the runbook it follows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from labkeeper import metrics
from labkeeper.secrets import redact

if TYPE_CHECKING:  # tasks.common imports this module: keep it light
    from labkeeper.inventory import Inventory

Logger = logging.Logger | logging.LoggerAdapter[Any]


def failure_of(state: Any) -> BaseException | None:
    """The exception a Failed state carries, without raising it."""
    data = getattr(state, "data", None)
    if isinstance(data, BaseException):
        return data
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # the result could not be read: judge that error
        return exc
    return result if isinstance(result, BaseException) else None


def state_error(state: Any) -> str:
    """``Type: message`` of the exception a failed state carries (else its message or
    name); not redacted."""
    exc = failure_of(state)
    return f"{type(exc).__name__}: {exc}" if exc else (state.message or state.name)


def cell(value: Any) -> str:
    """A markdown table cell: ``|`` escaped."""
    return str(value).replace("|", "\\|")


def warnings_section(warnings: Iterable[str]) -> list[str]:
    """The ``## Warnings`` list of a summary (nothing when there are none)."""
    shown = [f"- {redact(w)}" for w in warnings]
    return ["", "## Warnings", "", *shown] if shown else []


class RunReport:
    """Collects one run's metric samples; emits events and publishes the artifacts."""

    def __init__(self, inv: Inventory, key: str, logger: Logger, *,
                 started: float | None = None) -> None:
        self.inv = inv
        self.key = key
        self.logger = logger
        self.samples: list[metrics.Sample] = []
        self.started = time.monotonic() if started is None else started

    @property
    def elapsed(self) -> float:
        """Seconds since the report began (the run's work)."""
        return time.monotonic() - self.started

    def resource(self, rid: str, name: str, **labels: str) -> dict[str, str]:
        """A ``labkeeper.*`` Prefect event resource of this lab."""
        return {"prefect.resource.id": rid, "prefect.resource.name": name,
                "labkeeper.lab": self.inv.lab.name, **labels}

    def emit(self, event: str, resource: dict[str, str], payload: Mapping[str, Any]) -> None:
        emit_event(event=event, resource=resource, payload=dict(payload))

    def sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        self.samples.append(metrics.Sample(name, dict(labels), value))

    def record_metrics(self) -> None:
        """Write the samples (a metrics file that cannot be written is a warning)."""
        if not self.samples:
            return
        try:
            metrics.record(self.inv.settings.state_dir, self.inv.settings.metrics.textfile,
                           self.samples)
        except OSError as exc:
            self.logger.warning("metrics not recorded: %s", exc)

    def table(self, rows: list[dict[str, Any]], description: str, *,
              key: str | None = None) -> None:
        create_table_artifact(key=key or self.key, table=rows, description=description)

    def summary(self, markdown: str, description: str | None = None, *,
                key: str | None = None) -> None:
        """The markdown artifact (``<key>-summary`` unless ``key`` is given)."""
        create_markdown_artifact(key=key or f"{self.key}-summary", markdown=markdown,
                                 description=description)
