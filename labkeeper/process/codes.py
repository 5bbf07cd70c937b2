"""Exit-code tables: what each exit code of a tool means, and whether it is a failure.

A code a table does not list is an error (permanent); a child killed by a signal
reads ``killed by SIGNAME``.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Outcome = Literal["ok", "warning", "transient", "permanent"]


@dataclass(frozen=True)
class ExitCode:
    meaning: str
    outcome: Outcome


@dataclass(frozen=True)
class ExitCodeTable:
    """What a tool's exit codes mean. Codes not listed are errors."""

    tool: str
    codes: Mapping[int, ExitCode]

    def classify(self, returncode: int) -> ExitCode:
        if returncode in self.codes:
            return self.codes[returncode]
        if returncode < 0:
            try:
                name = signal.Signals(-returncode).name
            except ValueError:
                name = f"signal {-returncode}"
            return ExitCode(f"killed by {name}", "permanent")
        return ExitCode(f"unknown exit code {returncode} for {self.tool}", "permanent")


GENERIC = ExitCodeTable("command", {0: ExitCode("success", "ok")})


def is_ok(outcome: Outcome) -> bool:
    return outcome in ("ok", "warning")
