"""One command of a pipeline (:class:`Stage`), its callbacks, and argv validation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labkeeper.process.codes import GENERIC, ExitCodeTable

if TYPE_CHECKING:
    from labkeeper.process.early import EarlyStart

EofGate = Callable[[bytes, int], "str | None"]
"""``gate(tail, nbytes)``: called after a producer exited cleanly, with the last
:data:`GATE_TAIL_BYTES` of its stream and the stream's length; returns None when
the stream is complete, otherwise why it is not (the consumer then never gets EOF)."""


@dataclass(frozen=True)
class Stage:
    """One command of a pipeline."""

    argv: tuple[str, ...]
    codes: ExitCodeTable = GENERIC
    env: Mapping[str, str] = field(default_factory=dict)
    on_stderr_line: Callable[[str], None] | None = None
    eof_gate: EofGate | None = None
    """On a producer (not the last stage): decides at its clean exit whether its
    consumer may get EOF; see :data:`EofGate`."""
    on_bytes: Callable[[int], None] | None = None
    """On a producer: called from the relay with the size of each chunk handed to its
    consumer (progress, :mod:`labkeeper.progress`); must not raise."""
    early: EarlyStart | None = field(default=None, compare=False)
    """On a consumer: this command already started (:class:`EarlyStart`); the pipeline
    takes it over instead of starting it, when it is still waiting and was started as
    this stage (else the pipeline starts the stage itself)."""

    def __post_init__(self) -> None:
        check_argv(self.argv)


LineCallback = Callable[[str], None]

StageFactory = Callable[[], Stage]
"""A pipeline's first stage, made only once every later stage has started: whatever
the factory does (open a database snapshot the producer needs, say) overlaps their
start-up (restic's key derivation). If it raises, the started stages are SIGKILLed
before any input and the exception propagates unchanged."""


def check_argv(argv: Sequence[str]) -> None:
    if isinstance(argv, str | bytes):
        raise TypeError("argv must be a sequence of strings, not one string (no shells here)")
    if not argv:
        raise ValueError("argv is empty")
    for i, a in enumerate(argv):
        if not isinstance(a, str):
            raise TypeError(f"argv[{i}] is {type(a).__name__}, not str")
        if "\x00" in a:
            raise ValueError(f"argv[{i}] contains a NUL byte")
