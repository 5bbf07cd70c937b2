"""The base of every inventory model (strict, frozen) and helpers the sections share."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

_FIELDS_KEY = "labkeeper.fields"
_SKIP_XREF_KEY = "labkeeper.skip_xref"


class _Model(BaseModel):
    """Base of every inventory model: strict (unknown keys are errors) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True,
                              use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _remember_fields(cls, data: Any, info: ValidationInfo) -> Any:
        # The loader maps each mapping to the fields its model knows, for
        # "did you mean" hints on unknown keys.
        ctx = info.context
        if isinstance(ctx, dict) and isinstance(data, dict):
            ctx.setdefault(_FIELDS_KEY, {})[id(data)] = tuple(cls.model_fields)
        return data


def _exactly_one(model: BaseModel, names: Sequence[str], what: str) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        options = ", ".join(names)
        if not given:
            raise ValueError(f"{what}: set exactly one of {options}")
        raise ValueError(f"{what}: set exactly one of {options} (got {', '.join(given)})")


def _did_you_mean(value: str, known: Iterable[str]) -> str:
    matches = difflib.get_close_matches(value, [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""
