"""One API call as a value (:class:`ApiRequest`) and the shared parameter formats.

Pure: request builders in the sibling modules return these; only
:func:`labkeeper.proxmox.client.send` sends one. Every path value is percent-encoded
(proxmoxer does not encode; real PVE expects encoded values, as its web UI sends).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

GuestType = Literal["lxc", "qemu"]
Method = Literal["GET", "POST", "PUT", "DELETE"]


@dataclass(frozen=True)
class ApiRequest:
    """One API call: method, path template, path values, parameters (form/query)."""

    method: Method
    template: str
    path_params: tuple[tuple[str, str], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The URL path below ``/api2/json`` with every value percent-encoded."""
        values = dict(self.path_params)

        def repl(match: re.Match[str]) -> str:
            return quote(values[match.group(1)], safe="")

        return re.sub(r"\{([\w-]+)\}", repl, self.template)

    @property
    def display(self) -> str:
        """The path with values unencoded (for messages; never holds a secret)."""
        values = dict(self.path_params)
        return re.sub(r"\{([\w-]+)\}", lambda m: values[m.group(1)], self.template)


def _form_value(value: Any) -> Any:
    if isinstance(value, bool):
        return 1 if value else 0
    return value


def api_request(method: Method, template: str, params: Mapping[str, Any] | None = None,
                **path: Any) -> ApiRequest:
    """Build a request; ``None`` parameters are dropped, booleans become 1/0."""
    names = re.findall(r"\{([\w-]+)\}", template)
    if set(names) != set(path):
        raise ValueError(f"{template}: path values {sorted(path)} != {sorted(names)}")
    clean = {k: _form_value(v) for k, v in (params or {}).items() if v is not None}
    return ApiRequest(method, template, tuple((n, str(path[n])) for n in names), clean)


def join_ids(values: Iterable[int | str]) -> str:
    return ",".join(str(int(v)) for v in values)


def format_retention(keep: Mapping[str, int] | str | None) -> str | None:
    """``{"keep-last": 3, "keep-daily": 7}`` → ``keep-daily=7,keep-last=3`` (PVE's format)."""
    if keep is None or isinstance(keep, str):
        return keep
    allowed = ("keep-all", "keep-last", "keep-hourly", "keep-daily", "keep-weekly",
               "keep-monthly", "keep-yearly")
    parts = []
    for key in allowed:
        if key in keep and keep[key] is not None:
            value = int(keep[key])
            if value < 0:
                raise ValueError(f"{key} must be >= 0")
            parts.append(f"{key}={value}")
    unknown = set(keep) - set(allowed)
    if unknown:
        raise ValueError(f"unknown retention keys: {sorted(unknown)}")
    return ",".join(parts) or None


def format_tags(tags: Iterable[str] | str | None) -> str | None:
    if tags is None or isinstance(tags, str):
        return tags
    return ";".join(tags)
