"""The entry points: :func:`run` (one command) and :func:`pipeline` (stages connected
stdout to stdin, pipefail), with their argument checks and the errors they raise."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from labkeeper.errors import LabkeeperError, PipelineError
from labkeeper.process.codes import GENERIC, ExitCodeTable, is_ok
from labkeeper.process.engine import PipelineRun
from labkeeper.process.result import CommandResult, PipelineResult, error_for
from labkeeper.process.stage import LineCallback, Stage, StageFactory, check_argv
from labkeeper.secrets import REDACTOR

log = logging.getLogger("labkeeper.process")


def check_timeout(timeout: float) -> None:
    if timeout is None or not (timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    codes: ExitCodeTable = GENERIC,
    env: Mapping[str, str] | None = None,
    base_env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input: bytes | str | None = None,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    on_stdout_line: LineCallback | None = None,
    on_stderr_line: LineCallback | None = None,
    check: bool = True,
) -> CommandResult:
    """Run one command to completion.

    ``env`` is added to the inherited allowlist of this process's environment
    (:func:`inherited_env`; ``base_env`` replaces it).
    With ``check`` (the default) a failing exit code raises :class:`CommandError`
    (:class:`CommandTimeout` on timeout); otherwise the result is returned.
    """
    check_timeout(timeout)
    check_argv(argv)
    stage = Stage(tuple(argv), codes=codes, env=dict(env or {}), on_stderr_line=on_stderr_line)
    result = pipeline(
        [stage], timeout=timeout, base_env=base_env, cwd=cwd, input=input, stdin_fd=stdin_fd,
        stdout_fd=stdout_fd, on_stdout_line=on_stdout_line, check=False,
    )
    res = result.stages[0]
    if check and res.outcome not in ("ok", "warning"):
        raise error_for(res, timeout=timeout)
    return res


def pipeline(
    stages: Sequence[Stage | Sequence[str] | StageFactory],
    *,
    timeout: float,
    stall_timeout: float | None = None,
    base_env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    input: bytes | str | None = None,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    on_stdout_line: LineCallback | None = None,
    check: bool = True,
) -> PipelineResult:
    """Run stages connected stdout→stdin, with pipefail semantics.

    The first stage may be a :data:`StageFactory`, called after the later stages
    started (its time counts against ``timeout``).

    Succeeds only if every stage's exit code is ok (or a warning) per its table.
    On the first failure every other stage is killed; a consumer never receives
    EOF from a producer that did not exit cleanly, nor from one whose
    :attr:`Stage.eof_gate` refused its stream (that producer's result then reads
    ``refused at end of stream: <why>``, permanent). With ``stall_timeout``, a
    consumer that accepts no data for that many seconds gets every stage killed,
    consumers first (``killed: stalled ...``, transient). Raises
    :class:`PipelineError` (with every failed stage's error) when ``check`` is set.
    """
    norm = _checked_stages(stages, timeout=timeout, stall_timeout=stall_timeout,
                           input=input, stdin_fd=stdin_fd)
    data = input.encode() if isinstance(input, str) else input
    shown = " | ".join(" ".join(REDACTOR.redact_argv(s.argv)) if isinstance(s, Stage)
                       else "(made after the others start)" for s in norm)
    log.debug("running: %s (timeout %gs)", shown, timeout)
    runner = PipelineRun(norm, timeout=timeout, stall_timeout=stall_timeout, env=base_env,
                         cwd=cwd, input_data=data, stdin_fd=stdin_fd, stdout_fd=stdout_fd,
                         on_stdout_line=on_stdout_line)
    results, duration = runner.execute()
    failed = [i for i, r in enumerate(results) if not is_ok(r.outcome)]
    cause = _cause(failed, runner)
    relays = runner.relays
    out = PipelineResult(
        stages=tuple(results), duration=duration,
        bytes_relayed=tuple(r.bytes for r in relays),
        eof_given=tuple(r.eof_given for r in relays),
        refused=tuple(r.refused for r in relays),
        stalled=runner.stalled, timed_out=runner.timed_out, cause=cause,
    )
    for i in failed:
        log.debug("stage %d %s: exit %s (%s)", i + 1, results[i].argv[0],
                  results[i].returncode, results[i].meaning)
    if check and cause is not None:
        raise _failure(results, failed, cause, norm, timeout=timeout)
    return out


def _checked_stages(stages: Sequence[Stage | Sequence[str] | StageFactory], *,
                    timeout: float, stall_timeout: float | None,
                    input: bytes | str | None, stdin_fd: int | None,
                    ) -> list[Stage | StageFactory]:
    """The arguments of :func:`pipeline` checked, its stages as :class:`Stage`
    (a leading factory kept as is)."""
    check_timeout(timeout)
    if stall_timeout is not None:
        check_timeout(stall_timeout)
    if input is not None and stdin_fd is not None:
        raise ValueError("give either input or stdin_fd, not both")
    if not stages:
        raise ValueError("a pipeline needs at least one stage")
    factory = stages[0] if callable(stages[0]) and len(stages) > 1 else None
    if any(callable(s) for s in stages[1 if factory else 0:]):
        raise ValueError("only the first stage of a pipeline (of two or more) may be made "
                         "by a factory")
    norm: list[Stage | StageFactory] = [
        s if isinstance(s, Stage) or s is factory else Stage(tuple(s))  # type: ignore[arg-type]
        for s in stages]
    last = norm[-1]
    if isinstance(last, Stage) and last.eof_gate is not None:
        raise ValueError("eof_gate belongs on a producer; the last stage has no consumer")
    return norm


def _cause(failed: list[int], runner: PipelineRun) -> int | None:
    """The failed stage that was not killed by us, earliest first; None if none failed."""
    if not failed:
        return None
    not_killed = [i for i in failed if i not in runner.killed_because]
    candidates = not_killed or failed
    return min(candidates, key=lambda i: runner.exit_times.get(i, float("inf")))


def _failure(results: list[CommandResult], failed: list[int], cause: int,
             norm: list[Stage | StageFactory], *, timeout: float) -> LabkeeperError:
    """The error :func:`pipeline` raises: the cause's own error for a single command,
    else a :class:`PipelineError` carrying every failed stage's error."""
    errors = [error_for(results[i], timeout=timeout) for i in failed]
    first = errors[failed.index(cause)]
    if len(norm) == 1:
        return first
    return PipelineError(
        f"pipeline failed at stage {cause + 1} ({results[cause].argv[0]}): {first}",
        failures=errors, first=first,
    )
