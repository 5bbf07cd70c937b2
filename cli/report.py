"""How the command line shows a finished flow run: its result table and exit code."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from labkeeper.secrets import redact
from tasks.common import failure_of


def print_run(state: Any, *, title: str, cols: Sequence[str], name_col: str,
              what: str) -> int:
    """Print the run's rows (also those of a failed run) and notes; 0 when it completed."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    rows: list[dict[str, Any]] = []
    if state.is_completed():
        rows = state.result()
    else:
        exc = failure_of(state)
        rows = getattr(exc, "rows", []) or []
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
