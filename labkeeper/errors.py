"""One exception hierarchy for labkeeper.

Every error says whether it is *transient* (worth retrying: a timeout, a
connection reset, a lock held by someone else, an HTTP 5xx) or *permanent*
(fail now: wrong password, bad inventory, a missing repository, HTTP 4xx).
Prefect tasks retry only when :func:`is_transient` says so.

Errors carry structured fields (never secret values: messages and fields are
redacted by the code that raises them). They cross process boundaries (Prefect
results, subprocess workers), so every one pickles with its fields, whatever its
constructor looks like (:class:`PicklableError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar


class PicklableError(Exception):
    """An exception that pickles as its arguments and its attributes: it is rebuilt
    without calling ``__init__``, so keyword-only or computed constructor arguments
    need no hand-written ``__reduce__``. Attributes named in ``_pickle_omit`` (large
    or process-local ones) arrive as None."""

    _pickle_omit: ClassVar[tuple[str, ...]] = ()

    def __reduce__(self) -> tuple[Any, ...]:
        state = dict(self.__dict__)
        for name in self._pickle_omit:
            if name in state:
                state[name] = None
        return (_rebuild_error, (type(self), self.args, state))


def _rebuild_error(cls: type[PicklableError], args: tuple[Any, ...],
                   state: dict[str, Any]) -> PicklableError:
    exc = cls.__new__(cls, *args)
    exc.args = args
    exc.__dict__.update(state)
    return exc


class LabkeeperError(PicklableError):
    """Base of every labkeeper error."""

    transient: bool = False

    def __init__(self, message: str, *, transient: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if transient is not None:
            self.transient = transient

    def __str__(self) -> str:
        return self.message


class TransientError(LabkeeperError):
    """A failure that may go away if retried."""

    transient = True


class PermanentError(LabkeeperError):
    """A failure that retrying will not fix."""

    transient = False


class ConfigError(PermanentError):
    """Bad inventory or bad arguments. ``problems`` lists every problem found."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


class SecretError(PermanentError):
    """A secret reference could not be resolved. Names the reference, never a value."""

    def __init__(self, message: str, reference: str) -> None:
        super().__init__(message)
        self.reference = reference


class CommandError(LabkeeperError):
    """A child process (or remote command) failed.

    ``argv`` is already redacted; ``stderr_tail`` holds the last lines of its
    standard error, redacted too.
    """

    def __init__(
        self,
        message: str,
        *,
        argv: Sequence[str],
        returncode: int | None,
        stderr_tail: str = "",
        meaning: str = "",
        transient: bool = False,
    ) -> None:
        super().__init__(message, transient=transient)
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.meaning = meaning


class CommandTimeout(CommandError):
    """A child process ran past its deadline and was killed."""

    def __init__(self, message: str, *, argv: Sequence[str], timeout: float,
                 stderr_tail: str = "") -> None:
        super().__init__(message, argv=argv, returncode=None, stderr_tail=stderr_tail,
                         meaning="timeout", transient=True)
        self.timeout = timeout


class CommandNotFound(CommandError):
    """The program to run does not exist on this host."""

    def __init__(self, message: str, *, argv: Sequence[str]) -> None:
        super().__init__(message, argv=argv, returncode=None, meaning="not found",
                         transient=False)


class PipelineError(LabkeeperError):
    """At least one stage of a pipeline failed (pipefail semantics).

    ``failures`` holds the :class:`CommandError` of every stage that failed, in
    stage order; ``first`` is the stage that failed first in time, which is
    usually the cause (the others were killed because of it).
    """

    def __init__(self, message: str, *, failures: Sequence[CommandError],
                 first: CommandError) -> None:
        transient = first.transient
        super().__init__(message, transient=transient)
        self.failures = list(failures)
        self.first = first


class SSHError(LabkeeperError):
    """Base of SSH errors (connection, authentication, host key)."""


class SSHConnectError(SSHError, TransientError):
    """The host could not be reached (refused, timed out, reset)."""

    transient = True


class SSHAuthError(SSHError, PermanentError):
    """The host refused our key."""

    transient = False


class HostKeyError(SSHError, PermanentError):
    """The host's key is unknown or does not match known_hosts."""

    transient = False

    def __init__(self, message: str, *, host: str, fingerprint: str = "") -> None:
        super().__init__(message)
        self.host = host
        self.fingerprint = fingerprint


class ServiceError(LabkeeperError):
    """An API (Proxmox, S3, Prefect, HTTP) answered with an error."""

    def __init__(self, message: str, *, service: str, status: int | None = None,
                 transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.service = service
        self.status = status


class TaskTimeout(TransientError):
    """Waiting on a long-running remote task (a Proxmox UPID, say) ran out of time."""


def is_transient(exc: BaseException | None) -> bool:
    """Return True when retrying may help: only labkeeper errors marked transient
    and plain OS-level connection/timeout errors qualify."""
    if exc is None:
        return False
    if isinstance(exc, LabkeeperError):
        return exc.transient
    return isinstance(exc, (ConnectionError, TimeoutError))
