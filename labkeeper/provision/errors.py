"""Why provisioning stops for a guest: a conflict, a taken vmid, no SSH, too many changes."""

from __future__ import annotations

from labkeeper.errors import ConfigError, PermanentError


class ProvisionError(PermanentError):
    """Provisioning cannot go on for a guest (a missing template, a conflict...)."""


class VmidTaken(ProvisionError):
    """The inventory's vmid is held by another guest (never cleaned up by us)."""


class GuestUnreachable(PermanentError):
    """The guest did not answer SSH in time (or offered the wrong host key)."""


class TooManyChanges(ConfigError):
    """The plan touches more guests than ``max_changes_without_yes``."""
