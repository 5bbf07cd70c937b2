"""Guests ordered by ``depends_on`` for a runbook's start and stop steps (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from labkeeper.errors import ConfigError
from labkeeper.inventory import Inventory


def start_order(inv: Inventory, names: Sequence[str]) -> list[str]:
    """``names`` ordered so each guest starts after the guests it depends on (among
    ``names``; stable otherwise). Stop order is the reverse."""
    chosen = list(dict.fromkeys(names))
    deps = {n: [d for d in (inv.guest(n).depends_on or []) if d in chosen] for n in chosen}
    out: list[str] = []
    seen: set[str] = set()

    def visit(n: str, path: tuple[str, ...]) -> None:
        if n in seen:
            return
        if n in path:
            raise ConfigError(f"guests depend on each other in a cycle: {' -> '.join((*path, n))}")
        for d in deps[n]:
            visit(d, (*path, n))
        seen.add(n)
        out.append(n)

    for n in chosen:
        visit(n, ())
    return out
