"""`labkeeper runbook ...`: list, show, run and approve runbooks."""

from __future__ import annotations

import typer

runbook_app = typer.Typer(no_args_is_help=True)
