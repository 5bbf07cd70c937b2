"""What a finished command or pipeline did, and the typed error made of a failure.

Shared with the SSH runner (``host`` names the remote target). Every ``argv`` and
``stderr`` held here is already redacted.
"""

from __future__ import annotations

from dataclasses import dataclass

from labkeeper.errors import CommandError, CommandTimeout
from labkeeper.process.codes import Outcome

STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class CommandResult:
    """What a finished command did. ``argv`` is redacted. Shared with the SSH runner."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    duration: float
    meaning: str = "success"
    outcome: Outcome = "ok"
    host: str = "localhost"
    truncated: bool = False
    """True when stdout or stderr exceeded :data:`CAPTURE_LIMIT` and was cut."""

    @property
    def ok(self) -> bool:
        return self.outcome in ("ok", "warning")

    @property
    def warning(self) -> bool:
        return self.outcome == "warning"

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> str:
        return "\n".join(self.stderr.splitlines()[-lines:])


@dataclass(frozen=True)
class PipelineResult:
    """What a pipeline did. Tuples ``bytes_relayed``, ``eof_given`` and ``refused``
    have one entry per relay (relay *i* connects stage *i* to stage *i+1*)."""

    stages: tuple[CommandResult, ...]
    duration: float
    bytes_relayed: tuple[int, ...] = ()
    eof_given: tuple[bool, ...] = ()
    """Whether stage *i+1* got a clean end-of-stream while it was alive."""
    refused: tuple[str | None, ...] = ()
    """Why relay *i* withheld EOF although its producer exited cleanly (the gate's
    refusal, or a relay error); None when it did not."""
    stalled: bool = False
    """A consumer accepted no data for ``stall_timeout``: every stage was killed."""
    timed_out: bool = False
    cause: int | None = None
    """Index of the stage whose failure made the pipeline fail (the earliest failed
    stage that was not killed by us); None when every stage is ok."""

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.stages)

    @property
    def stdout(self) -> str:
        return self.stages[-1].stdout

    @property
    def last(self) -> CommandResult:
        return self.stages[-1]


def make_error(result: CommandResult, *, killed_because: str = "") -> CommandError:
    """The typed error for a failed result, carrying exit code and stderr tail."""
    tail = result.stderr_tail()
    last = tail.splitlines()[-1] if tail else ""
    why = killed_because or result.meaning
    message = f"{result.argv[0]} failed on {result.host} (exit {result.returncode}: {why})"
    if last:
        message += f": {last}"
    return CommandError(
        message,
        argv=result.argv,
        returncode=result.returncode,
        stderr_tail=tail,
        meaning=why,
        transient=result.outcome == "transient",
    )


def error_for(res: CommandResult, *, timeout: float) -> CommandError:
    if res.meaning.startswith("killed: timeout"):
        return CommandTimeout(
            f"{res.argv[0]} timed out after {timeout:g}s", argv=res.argv, timeout=timeout,
            stderr_tail=res.stderr_tail(),
        )
    return make_error(res)
