"""Proxmox config values as provisioning compares them, and unique entry names."""

from __future__ import annotations

import re
from typing import Any


def norm(value: Any) -> str:
    """PVE's value as text, as provisioning compares it (``1.0`` → ``1``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return int(value)
    try:
        return int(float(str(value)))
    except ValueError:
        return None


def unique_name(job_id: str, taken: set[str]) -> str:
    name = re.sub(r"[^a-z0-9_-]+", "-", job_id.lower()).strip("-_")[:55] or "job"
    if not name[0].isalnum():
        name = "j" + name
    base, n = name, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    taken.add(name)
    return name
