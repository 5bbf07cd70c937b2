"""How the command line shows a finished flow run: its result table and exit code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labkeeper.secrets import redact
from tasks.common import failure_of


def state_rows(state: Any) -> tuple[list[dict[str, Any]], BaseException | None]:
    """A finished run's result rows and, for a run that did not complete, its error (a
    failed job still carries the rows it got to)."""
    if state.is_completed():
        result = state.result()
        return (result if isinstance(result, list) else []), None
    exc = failure_of(state)
    return list(getattr(exc, "rows", None) or []), exc


def print_run(state: Any, *, title: str, cols: Sequence[str], name_col: str,
              what: str) -> int:
    """Print the run's rows (also those of a failed run) and notes; 0 when it completed."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows, exc = state_rows(state)
    if not state.is_completed():
        console.print(f"[red]{what} failed:[/red] {redact(str(exc) if exc else state.name)}")
    if rows:
        table = Table(title=title)
        for col in cols:
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(*(str(r.get(c, "")) for c in cols))
        console.print(table)
        for r in rows:
            if r.get("notes"):
                console.print(f"{r[name_col]}: {r['notes']}", markup=False)
    return 0 if state.is_completed() else 1
