"""Inventory sections ``lab:`` and ``settings:``: who the lab is, and labkeeper's own
places, sites and knobs (state and cache directories, metrics, provision guardrails,
job waits)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator

from labkeeper import userdirs
from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import (
    AbsPath,
    IPAddr,
    Name,
    NonNegInt,
    NonNegSeconds,
    Port,
    PositiveInt,
    Seconds,
    Tag,
    TimeZone,
)
from labkeeper.inventory.sites import SiteName, Sites


class Lab(_Model):
    """Who this lab is. ``name`` is restic's ``--host`` for every snapshot."""

    name: Name
    timezone: TimeZone = "UTC"
    domain: str | None = None
    """DNS search domain of the lab (e.g. ``home.arpa``), informational."""


class Metrics(_Model):
    """Prometheus metrics: a textfile-collector file and/or a /metrics listener."""

    textfile: AbsPath | None = None
    """Rewritten after every job, for node_exporter's textfile collector."""
    listen_address: IPAddr | None = None
    listen_port: Port | None = None
    """/metrics, served by ``labkeeper serve`` and ``labkeeper metrics serve``."""

    @model_validator(mode="after")
    def _pair(self) -> Metrics:
        if (self.listen_address is None) != (self.listen_port is None):
            raise ValueError("listen_address and listen_port go together")
        return self


class ProvisionSettings(_Model):
    """Guardrails for the provision flow (issue 6)."""

    managed_tag: Tag = "labkeeper"
    """Guests without this tag are never modified."""
    max_changes_without_yes: PositiveInt = 5
    cleanup_on_failure: Literal["destroy", "report"] = "destroy"
    ssh_wait_timeout: Seconds = 300
    guest_state_dir: AbsPath = Path("/var/lib/labkeeper")
    """On each guest: where bootstrap keeps its markers (what it already did)."""


class JobTuning(_Model):
    """Waits and polls inside the jobs (internal knobs, kept off the Prefect Run forms)."""

    stall_timeout: Seconds = 300
    """pg_backup: seconds restic may accept no data before the dump and restic are
    killed (its repository backend is down) and the database is reported failed."""
    update_lock_timeout: NonNegSeconds = 10
    """update: seconds to wait for another update of the same guest before the app is
    reported ``blocked``."""
    approval_poll: PositiveInt = 10
    """runbook: seconds between checks for an operator's answer to an approval step."""
    drill_guest_poll: Seconds = 0.5
    """dr_drill: first seconds between Proxmox task polls of a guest drill."""
    vzdump_poll_max: Seconds = 5
    """vzdump: most seconds between Proxmox task-status polls."""
    vzdump_lock_retries: NonNegInt = 2
    """vzdump: how often a guest that is locked (by another task) is tried again."""
    vzdump_lock_retry_delay: NonNegSeconds = 30
    """vzdump: seconds between those tries."""
    site_check_timeout: Seconds = 3
    """site-check: seconds per reachability probe."""


class Settings(_Model):
    state_dir: AbsPath = Field(default_factory=userdirs.default_state_dir)
    """Where labkeeper keeps its state (pending cleanups, metrics, restic caches); default
    ``/var/lib/labkeeper`` for root or a user who can write it, else
    ``$XDG_STATE_HOME/labkeeper`` (``~/.local/state/labkeeper``)."""
    known_hosts: AbsPath = Field(default_factory=userdirs.default_known_hosts)
    """SSH host keys, checked strictly; default ``/etc/labkeeper/known_hosts`` for root
    or a user who can read it, else ``$XDG_CONFIG_HOME/labkeeper/known_hosts``
    (``~/.config/labkeeper/known_hosts``)."""
    cache_dir: AbsPath | None = None
    """restic cache root (one sub-directory per repository); default ``$RESTIC_CACHE_DIR``
    when the environment sets it, else ``state_dir/cache``."""
    restic_binary: str | None = None
    """The restic labkeeper runs here for every repository (a full path when the machine
    has several); default ``$LABKEEPER_RESTIC``, else ``restic`` on PATH. Path sets name
    their host's restic in ``path_backups[].restic_binary``."""
    work_pool: Name = "homelab"
    sites: Sites = {}
    """Several machines: each site's worker and queue (labkeeper/inventory/sites.py)."""
    default_site: SiteName | None = None
    """Where jobs without ``site:`` run; default: the first site."""
    metrics: Metrics = Metrics()
    provision: ProvisionSettings = ProvisionSettings()
    tuning: JobTuning = JobTuning()
    """Internal waits and polls of the jobs (not on the Run forms)."""
    progress_interval: Seconds = 30
    """Seconds between progress lines (bytes, rate, ETA) of a long stream in the run
    log: database dumps and restores, drills, vzdump off-site copies; a line also at
    every 10 % of a known size. A terminal shows a live bar as well."""
    pg_backup_parallel: Annotated[int, Field(ge=1, le=16)] = 1
    """Databases a pg_backup run dumps at the same time (one Prefect run, one globals
    dump per server either way). Each runs pg_dump and two restics: more than the
    machine's cores buys nothing; with restic 0.14 a lock released by one backup while
    another restic of the same repository checks locks costs that restic 45-95 s."""

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.state_dir / "cache"
