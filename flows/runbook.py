"""The runbook flow: run one runbook from runbooks/ with its parameters."""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="runbook", timeout_seconds=6 * 3600)
def runbook_flow(name: str, params: dict[str, Any] | None = None, dry_run: bool = False,
                 yes: bool = False, lab: str | None = None) -> dict[str, Any]:
    """Run the runbook NAME (placeholder until the engine lands)."""
    raise NotImplementedError(name)
