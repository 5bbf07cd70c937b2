"""The one subprocess runner: argv tuples, deadlines, pipefail pipelines, typed errors.

- Commands are argv tuples; there is no shell anywhere.
- Every call has a timeout; on expiry the whole process group is killed.
- Secrets reach children through ``env`` (never argv); argv, stderr and the
  errors we raise are masked with :data:`labkeeper.secrets.REDACTOR`. A child
  inherits only an allowlist of this process's environment (:func:`inherited_env`).
- Pipelines connect stage *i*'s stdout to stage *i+1*'s stdin through a relay we
  own: a consumer never sees a clean EOF from a producer that failed, or whose
  end-of-stream gate (``Stage.eof_gate``) refused its stream; with
  ``stall_timeout`` a consumer that stops accepting data gets the pipeline killed.
- Long-lived children with pipes (a ``psql`` session) use :class:`Coprocess`; a
  consumer may be started ahead of its pipeline (:class:`EarlyStart`).
- Exit codes are read through one :class:`ExitCodeTable` per tool; a code the
  table does not know is an error.

Modules: :mod:`.codes` (exit-code tables), :mod:`.result` (results, errors),
:mod:`.stage`, :mod:`.env`, :mod:`.children`, :mod:`.capture`, :mod:`.coprocess`,
:mod:`.early`, :mod:`.relay` and :mod:`.engine` (the pipeline machinery), :mod:`.runner`
(:func:`run`, :func:`pipeline`).
"""

from labkeeper.process.capture import CAPTURE_LIMIT
from labkeeper.process.children import KILL_GRACE, dies_with_parent
from labkeeper.process.codes import GENERIC, ExitCode, ExitCodeTable, Outcome
from labkeeper.process.coprocess import Coprocess
from labkeeper.process.early import EarlyStart
from labkeeper.process.engine import LINGER_GRACE
from labkeeper.process.env import BASE_ENV_NAMES, EXTRA_ENV_VARIABLE, inherited_env
from labkeeper.process.relay import GATE_TAIL_BYTES
from labkeeper.process.result import (
    STDERR_TAIL_LINES,
    CommandResult,
    PipelineResult,
    make_error,
)
from labkeeper.process.runner import pipeline, run
from labkeeper.process.stage import EofGate, LineCallback, Stage, StageFactory, check_argv

__all__ = [
    "BASE_ENV_NAMES",
    "CAPTURE_LIMIT",
    "EXTRA_ENV_VARIABLE",
    "GATE_TAIL_BYTES",
    "GENERIC",
    "KILL_GRACE",
    "LINGER_GRACE",
    "STDERR_TAIL_LINES",
    "CommandResult",
    "Coprocess",
    "EarlyStart",
    "EofGate",
    "ExitCode",
    "ExitCodeTable",
    "LineCallback",
    "Outcome",
    "PipelineResult",
    "Stage",
    "StageFactory",
    "check_argv",
    "dies_with_parent",
    "inherited_env",
    "make_error",
    "pipeline",
    "run",
]
