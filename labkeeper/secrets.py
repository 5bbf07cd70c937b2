"""Secret references, resolved at run time, and redaction of resolved values.

The inventory never holds a secret, only a *reference* to one:

- ``env:NAME``            the environment variable NAME of the process resolving it
- ``file:/path``          the contents of a file (one trailing newline stripped)
- ``prefect-block:NAME``  a Prefect ``Secret`` block

:func:`resolve` turns a reference into a :class:`pydantic.SecretStr` and
registers the value with the process-wide :data:`REDACTOR`, so every logger
carrying :class:`RedactingFilter` and every runner masks it from then on.
Credentials inside URLs (``https://user:token@host/``) are masked too, whether
or not they were ever resolved (:func:`redact_url_credentials`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import Annotated, cast

from pydantic import AfterValidator, SecretStr

from labkeeper.errors import SecretError

MASK = "********"
SCHEMES = ("env", "file", "prefect-block")
_REF_RE = re.compile(r"^(env|file|prefect-block):(.+)$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_BLOCK_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# Values shorter than this are not masked on their own (masking "a" everywhere
# would destroy logs); such secrets are refused at resolution instead.
MIN_SECRET_LENGTH = 4


def check_reference(ref: str) -> str:
    """Validate the shape of a secret reference (not its existence)."""
    m = _REF_RE.match(ref)
    if not m:
        raise ValueError(
            f"not a secret reference: expected env:NAME, file:/path or prefect-block:NAME "
            f"(got {_describe(ref)})"
        )
    scheme, rest = m.groups()
    if scheme == "env" and not _ENV_NAME_RE.match(rest):
        raise ValueError(f"env: reference needs a variable name, got {rest!r}")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError(f"file: reference needs an absolute path, got {rest!r}")
    if scheme == "prefect-block" and not _BLOCK_NAME_RE.match(rest):
        raise ValueError(
            f"prefect-block: reference needs a block name (lowercase, digits, dashes), "
            f"got {rest!r}"
        )
    return ref


def _describe(value: str) -> str:
    # Never echo something that might be a pasted secret: show only its shape.
    return f"a {len(value)}-character string without a scheme"


SecretRef = Annotated[str, AfterValidator(check_reference)]
"""A field type for inventory models: a reference, validated in shape only."""


_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@?#]*)(?::(?P<pw>[^/\s@?#]*))?@")


def _mask_userinfo(m: re.Match[str]) -> str:
    scheme, user, pw = m["scheme"], m["user"], m["pw"]
    if pw is not None:
        return f"{scheme}{user}:{MASK}@"
    if scheme.lower() in ("http://", "https://") and user:
        return f"{scheme}{MASK}@"  # a token as the user name (https://TOKEN@github.com/...)
    return m.group(0)  # ssh://git@host: a user name, not a credential


def redact_url_credentials(text: str) -> str:
    """Mask the credentials of every URL in ``text``: the password of
    ``scheme://user:password@``, and the whole user part of ``https://token@``."""
    if "@" not in text or "://" not in text:
        return text
    return _URL_USERINFO.sub(_mask_userinfo, text)


class Redactor:
    """The set of secret values known to this process; masks them in text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str) -> None:
        if len(value) < MIN_SECRET_LENGTH:
            return
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            # Longest first so a secret containing another is masked whole.
            alts = sorted(self._values, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(v) for v in alts))

    @property
    def active(self) -> bool:
        return self._pattern is not None

    def redact(self, text: str) -> str:
        """``text`` with every known value and every URL's credentials masked."""
        if not text:
            return text
        pattern = self._pattern
        if pattern is not None:
            text = pattern.sub(MASK, text)
        return redact_url_credentials(text)

    def redact_argv(self, argv: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        return tuple(self.redact(a) for a in argv)

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._pattern = None

    def __contains__(self, value: str) -> bool:
        return value in self._values


REDACTOR = Redactor()


def redact(text: str) -> str:
    """Mask every secret value resolved so far in ``text``."""
    return REDACTOR.redact(text)


def register(value: str) -> None:
    """Make an already-known secret value (a generated password, say) masked too."""
    REDACTOR.add(value)


_EXC_FORMATTER = logging.Formatter()


def redact_record(record: logging.LogRecord) -> None:
    """Mask secrets in a log record in place: its message (``msg`` % ``args``), its
    exception's traceback (formatted now into ``exc_text``; ``exc_info`` dropped so
    no handler formats the raw exception again) and its stack info."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: leave it to the handler
        message = None
    if message is not None:
        masked = REDACTOR.redact(message)
        if masked != message or record.args:
            record.msg = masked
            record.args = None
    if record.exc_info and record.exc_info[0] is not None:
        text = record.exc_text or _EXC_FORMATTER.formatException(record.exc_info)
        record.exc_text = REDACTOR.redact(text)
        record.exc_info = None
    elif record.exc_text:
        record.exc_text = REDACTOR.redact(record.exc_text)
    if record.stack_info:
        record.stack_info = REDACTOR.redact(record.stack_info)


class RedactingFilter(logging.Filter):
    """A logging filter that masks resolved secrets (and URL credentials) in the
    formatted message and in the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        redact_record(record)
        return True


_factory_installed = False


def install_redaction() -> None:
    """Mask resolved secrets and URL credentials in every log record this process
    creates, tracebacks included.

    A filter on a parent logger does not see records propagated from its
    children (Prefect's run loggers), so the mask is applied where records are
    born: a wrapped log-record factory. Idempotent.
    """
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redact_record(record)
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def resolve(ref: str, *, environ: dict[str, str] | None = None) -> SecretStr:
    """Resolve a reference to its value. Raises :class:`SecretError` naming the
    reference (never a value) when it cannot be resolved."""
    try:
        check_reference(ref)
    except ValueError as exc:
        raise SecretError(str(exc), reference="<malformed>") from None
    scheme, _, rest = ref.partition(":")
    env = os.environ if environ is None else environ
    if scheme == "env":
        if rest not in env:
            raise SecretError(f"secret {ref}: environment variable {rest} is not set",
                              reference=ref)
        value = env[rest]
    elif scheme == "file":
        path = Path(rest)
        try:
            value = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SecretError(f"secret {ref}: file does not exist", reference=ref) from None
        except PermissionError:
            raise SecretError(f"secret {ref}: file is not readable", reference=ref) from None
        except IsADirectoryError:
            raise SecretError(f"secret {ref}: is a directory", reference=ref) from None
        if value.endswith("\n"):
            value = value[:-1]
            if value.endswith("\r"):
                value = value[:-1]
    else:
        value = _resolve_prefect_block(ref, rest)
    if not value:
        raise SecretError(f"secret {ref}: resolved to an empty value", reference=ref)
    if len(value) < MIN_SECRET_LENGTH:
        raise SecretError(
            f"secret {ref}: shorter than {MIN_SECRET_LENGTH} characters, refused "
            "(it could not be masked in logs)",
            reference=ref,
        )
    REDACTOR.add(value)
    return SecretStr(value)


def _resolve_prefect_block(ref: str, name: str) -> str:
    # Imported here: the core library does not need Prefect unless a block is used.
    try:
        from prefect.blocks.system import Secret
    except ImportError:  # pragma: no cover - prefect is a dependency
        raise SecretError(f"secret {ref}: prefect is not installed", reference=ref) from None
    try:
        # _sync: Prefect's load returns a coroutine where it sees a running event loop
        # or an async flow; resolve is synchronous everywhere. Its type omits _sync and
        # keeps the coroutine arm, hence the ignore and the cast.
        block = cast(Secret, Secret.load(name, _sync=True))  # type: ignore[call-arg]
    except ValueError:
        raise SecretError(f"secret {ref}: no Secret block named {name!r}",
                          reference=ref) from None
    value = block.get()
    if not isinstance(value, str):
        raise SecretError(f"secret {ref}: the block does not hold a string", reference=ref)
    return value
