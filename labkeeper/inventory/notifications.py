"""Inventory section ``notifications:``: Apprise URLs, healthchecks.io-style pings and
which events notify."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import Cron, HttpUrl, Seconds, Secret

FlowName = Literal[
    "doctor", "pg_backup", "repo_maintenance", "vzdump", "provision", "update", "dr_drill",
    "runbook", "path_backup", "missing_backup",
]


class Healthchecks(_Model):
    """Dead-man's-switch pings (healthchecks.io style): ``/start``, success and
    ``/fail``. Each ping value resolves to a full URL, or to a check UUID/slug
    appended to ``base_url``."""

    base_url: HttpUrl | None = None
    pings: dict[FlowName, Secret] = {}
    timeout: Seconds = 10


NotifyEvent = Literal["failure", "rollback", "drill", "missing_backup", "success"]


class Notifications(_Model):
    apprise: list[Secret] = []
    """Apprise URLs (they carry tokens, so they are secret references)."""
    healthchecks: Healthchecks | None = None
    on: list[NotifyEvent] = ["failure", "rollback", "drill", "missing_backup"]
    missing_backup_schedule: Cron = "0 9 * * *"
    """When the dead-man's check looks for a backup within each RPO."""

    @model_validator(mode="before")
    @classmethod
    def _yaml11_on(cls, data: Any) -> Any:
        # A plain YAML 1.1 loader reads the key `on` as the boolean True.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data
