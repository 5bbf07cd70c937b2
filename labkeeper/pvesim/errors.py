"""The simulator's HTTP error: an answer in PVE's shape (status, message, field errors)."""

from __future__ import annotations

from collections.abc import Mapping


class ApiError(Exception):
    """An HTTP error answer in PVE's shape."""

    def __init__(
        self, status: int, message: str, errors: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = dict(errors) if errors else None
