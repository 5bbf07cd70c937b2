"""Every secret reference in an inventory: model values walked alongside their
annotations (a field is secret when its type carries the :data:`SecretRef` check)."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BaseModel

from labkeeper.secrets import check_reference


def _is_secret_annotation(metadata: Iterable[Any]) -> bool:
    return any(
        isinstance(m, AfterValidator) and m.func is check_reference for m in metadata
    )


def secret_values(model: BaseModel) -> Iterator[str]:
    """The secret references in ``model``, in field order (repeats included)."""
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if _is_secret_annotation(info.metadata):
            if isinstance(value, str):
                yield value
            continue
        yield from _secrets_in(value, info.annotation)


def _secrets_in(value: Any, annotation: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, BaseModel):
        yield from secret_values(value)
        return
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *metadata = typing.get_args(annotation)
        if _is_secret_annotation(metadata):
            if isinstance(value, str):
                yield value
            return
        yield from _secrets_in(value, base)
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                yield from _secrets_in(value, arg)
    else:
        yield from _secrets_in_items(value, origin, annotation)


def _secrets_in_items(value: Any, origin: Any, annotation: Any) -> Iterator[str]:
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        (arg, *_) = typing.get_args(annotation)
        for item in value:
            yield from _secrets_in(item, arg)
    elif origin is dict and isinstance(value, dict):
        arg = typing.get_args(annotation)[1]
        for item in value.values():
            yield from _secrets_in(item, arg)
