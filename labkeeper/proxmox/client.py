"""The thin layer: the only code that talks to proxmoxer.

:func:`call` types a proxmoxer failure: 5xx (except 501) and connection
resets/timeouts are transient, 4xx and 501 permanent, ``CT is locked (backup)`` /
``VM is locked (...)`` a transient :class:`GuestLocked` carrying the lock name.
:func:`send` sends one :class:`ApiRequest`; the ``*_op`` factories turn a request
builder into an operation returning a UPID, a list of models, or nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import requests
from pydantic import BaseModel

from labkeeper.errors import ServiceError
from labkeeper.proxmox.errors import GuestLocked, lock_name
from labkeeper.proxmox.models import Upid, as_upid
from labkeeper.proxmox.request import ApiRequest
from labkeeper.secrets import redact


def call(fn: Any, *args: Any, what: str = "", **kwargs: Any) -> Any:
    """Run one proxmoxer call and type its failure."""
    from proxmoxer.core import ResourceException

    try:
        return fn(*args, **kwargs)
    except ResourceException as exc:
        status = int(exc.status_code)
        reason = str(exc.content or "")
        detail = redact(f"{exc.status_message}: {reason}".strip(": "))
        if exc.errors:
            detail += " " + redact(str(exc.errors))
        message = f"proxmox {what}: HTTP {status} {detail}"
        lock = lock_name(reason) or lock_name(str(exc.errors or ""))
        if lock is not None:
            raise GuestLocked(message, lock=lock, status=status) from None
        raise ServiceError(message, service="proxmox", status=status,
                           transient=status >= 500 and status != 501) from None
    except requests.exceptions.SSLError as exc:
        raise ServiceError(f"proxmox {what}: TLS verification failed ({exc.__class__.__name__})",
                           service="proxmox", transient=False) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError) as exc:
        raise ServiceError(f"proxmox {what}: {exc.__class__.__name__}: {redact(str(exc))}",
                           service="proxmox", transient=True) from None


def send(api: Any, req: ApiRequest) -> Any:
    """Send one request through proxmoxer; failures typed by :func:`call`."""
    resource = api(req.path.lstrip("/")) if req.path != "/" else api
    fn = getattr(resource, req.method.lower())
    return call(fn, what=f"{req.method} {req.display}", **dict(req.params))


P = ParamSpec("P")
M = TypeVar("M", bound=BaseModel)


def task_op(builder: Callable[P, ApiRequest]) -> Callable[Concatenate[Any, P], Upid]:
    """An operation from a request builder: send the request, return the task's UPID."""

    @functools.wraps(builder)
    def op(api: Any, *args: P.args, **kwargs: P.kwargs) -> Upid:
        req = builder(*args, **kwargs)
        return as_upid(send(api, req), f"{req.method} {req.display}")

    op.__doc__ = f"Run {builder.__name__} and return the task's UPID.\n\n{builder.__doc__ or ''}"
    op.__name__ = builder.__name__.removesuffix("_request")
    return op


def list_op(builder: Callable[P, ApiRequest],
            model: type[M]) -> Callable[Concatenate[Any, P], list[M]]:
    """An operation from a request builder: send the request, read a list of ``model``."""

    @functools.wraps(builder)
    def op(api: Any, *args: P.args, **kwargs: P.kwargs) -> list[M]:
        return [model.model_validate(item) for item in send(api, builder(*args, **kwargs)) or []]

    op.__name__ = builder.__name__.removesuffix("_request")
    return op


def none_op(builder: Callable[P, ApiRequest]) -> Callable[Concatenate[Any, P], None]:
    """An operation from a request builder whose answer carries nothing to read."""

    @functools.wraps(builder)
    def op(api: Any, *args: P.args, **kwargs: P.kwargs) -> None:
        send(api, builder(*args, **kwargs))

    op.__name__ = builder.__name__.removesuffix("_request")
    return op
