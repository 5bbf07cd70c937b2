"""Inventory section ``pitr:``: point-in-time recovery per PostgreSQL server.

Each entry names one PostgreSQL *server* through a ``databases:`` entry on it (its
host, port, user, password and TLS settings are reused; the role needs the
``REPLICATION`` attribute, and ``EXECUTE`` on ``pg_switch_wal()`` when
``switch_wal`` is on). Strict models, like the rest of the inventory; look-ups that
need the whole inventory are plain functions here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, Field

from labkeeper.errors import ConfigError
from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import check_cron

if TYPE_CHECKING:
    from labkeeper.inventory import Database, Inventory, Repository

_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_SLOT = re.compile(r"^[a-z0-9_]{1,63}$")


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError("expected a name: lowercase letters, digits, '-' or '_'")
    return value


def _slot(value: str) -> str:
    if not _SLOT.match(value):
        raise ValueError("a replication slot name: lowercase letters, digits and '_'")
    return value


def _cron(value: str) -> str:
    return check_cron(value)


def _abs(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("expected an absolute path")
    return value


PitrName = Annotated[str, AfterValidator(_name)]
SlotName = Annotated[str, AfterValidator(_slot)]
CronExpr = Annotated[str, AfterValidator(_cron)]
AbsDir = Annotated[Path, AfterValidator(_abs)]
PosInt = Annotated[int, Field(ge=1)]


class PitrObjectives(_Model):
    rpo_minutes: PosInt = 15
    """Data a restore may lose: WAL not yet in the repository."""
    rto_minutes: PosInt = 60
    """How long a point-in-time restore may take."""


class PitrRetention(_Model):
    keep_base_backups: PosInt = 4
    """Base backups kept (newest first); WAL older than the oldest kept one is forgotten."""


class PitrWarn(_Model):
    slot_retained_mb: PosInt = 2048
    """Warn when the slot holds more WAL than this on the database server."""
    ship_lag_minutes: PosInt = 20
    """Warn when the oldest completed segment waited this long in the spool."""


class PitrServer(_Model):
    """Continuous archiving of one PostgreSQL server: base backups + WAL into restic."""

    name: PitrName
    """The server's label in tags (``pg:<name>``) and commands."""
    database: PitrName
    """A ``databases:`` entry on this server: its connection is used."""
    repository: PitrName | None = None
    """Default: the database's repository."""
    slot: SlotName | None = None
    """Replication slot of ``pg_receivewal``; default ``labkeeper_<name>``."""
    spool_dir: AbsDir | None = None
    """Where received WAL waits for shipping; default ``<state_dir>/pitr/<name>/spool``."""
    base_schedule: CronExpr = "0 3 * * 0"
    """When the base backup flow runs (weekly by default)."""
    ship_interval_minutes: PosInt = 5
    """How often the WAL ship flow runs: the RPO to the repository."""
    switch_wal: bool = True
    """Before shipping, ask the server to close its current segment (``pg_switch_wal``)
    when it wrote anything: the RPO is then the ship interval, not a segment's fill."""
    synchronous: bool = False
    """``pg_receivewal --synchronous``: flush on receipt (for synchronous_standby_names)."""
    objectives: PitrObjectives = PitrObjectives()
    retention: PitrRetention = PitrRetention()
    warn: PitrWarn = PitrWarn()
    timeout_minutes: PosInt = 240
    """Longest a base backup stream may take."""
    max_rate_kb: Annotated[int, Field(ge=32, le=1048576)] | None = None
    """Throttle base backups (``pg_basebackup --max-rate``, kB/s) to spare the server's disks."""

    @property
    def slot_name(self) -> str:
        return self.slot or "labkeeper_" + self.name.replace("-", "_")


# -- look-ups over the whole inventory (plain functions) ---------------------------------

def pitr_servers(inv: Inventory) -> list[PitrServer]:
    return list(getattr(inv, "pitr", []) or [])


def pitr_server(inv: Inventory, name: str) -> PitrServer:
    servers = pitr_servers(inv)
    for s in servers:
        if s.name == name:
            return s
    known = ", ".join(s.name for s in servers) or "none declared"
    raise ConfigError(f"no pitr server named {name!r} (pitr servers: {known})")


def pitr_database(inv: Inventory, server: PitrServer) -> Database:
    try:
        return inv.database(server.database)
    except ConfigError as exc:
        raise ConfigError(f"pitr {server.name}: database: {exc}") from None


def pitr_repository(inv: Inventory, server: PitrServer) -> Repository:
    if server.repository is not None:
        return inv.repository(server.repository)
    return inv.repository_for(pitr_database(inv, server))


def spool_dir(inv: Inventory, server: PitrServer) -> Path:
    return server.spool_dir or Path(inv.settings.state_dir) / "pitr" / server.name / "spool"
