"""Inventory section ``databases:``: PostgreSQL databases backed up with pg_dump into
restic, where they run (host, guest, container) and how their restore is drilled.

Also their cross-checks: the guest or SSH host, the repository and the drill server
each names.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from labkeeper.inventory.base import _exactly_one, _Model
from labkeeper.inventory.fields import (
    AbsPath,
    ContainerName,
    Cron,
    DockerHost,
    GuestName,
    HostAddr,
    Hours,
    Minutes,
    Name,
    PgIdent,
    Port,
    Secret,
    UserName,
    _int_to_str,
)
from labkeeper.inventory.guests import check_guest_ref
from labkeeper.inventory.repositories import check_repo
from labkeeper.inventory.sites import SiteName
from labkeeper.inventory.xref import CrossCheck, unknown

DRILL_DB_PREFIX = "labkeeper_drill_"
LOCAL_DRILL_SERVER = "local"


class SmokeQuery(_Model):
    """A query run against a restored database; must return one value that
    satisfies min / max / equals."""

    sql: Annotated[str, Field(min_length=1)]
    min: int | None = None
    max: int | None = None
    equals: Annotated[str | None, BeforeValidator(_int_to_str)] = None
    name: str | None = None

    @model_validator(mode="after")
    def _expect(self) -> SmokeQuery:
        if self.min is None and self.max is None and self.equals is None:
            raise ValueError("a smoke query needs min, max or equals")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class DatabaseDrill(_Model):
    enabled: bool = True
    schedule: Cron | None = None
    """Default: ``drills.schedule``."""
    server: Name = LOCAL_DRILL_SERVER
    """A server in ``drills.servers``, or ``local`` (libpq defaults of the worker)."""
    rto_minutes: Minutes = 60
    rpo_hours: Hours = 26
    keep_on_failure: bool = False
    smoke_queries: list[SmokeQuery] = []


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


LOCAL_DOCKER_HOST = "localhost"
"""``host:`` of a containerised database whose engine is on the worker itself: its
``docker`` runs here, without SSH."""


class DatabaseContainer(_Model):
    """PostgreSQL inside a container with no published port (an app's ``*_postgres``):
    the client tools run in the container (``docker exec``), on the SSH host or guest
    named by the database's ``host``/``guest`` (``host: localhost``: this worker)."""

    name: ContainerName
    docker_host: DockerHost | None = None
    """The engine's address when not the default socket (``docker --host``)."""
    pghost: str = "/var/run/postgresql"
    """Where the tools connect inside the container: its socket directory (the
    default: peer/trust auth as ``exec_user``) or an address such as 127.0.0.1."""
    exec_user: UserName = "postgres"
    """``docker exec -u``: the OS user the tools run as inside the container."""


class Database(_Model):
    """A PostgreSQL database backed up with pg_dump into a restic repository."""

    name: Name
    host: HostAddr | None = None
    guest: GuestName | None = None
    """Instead of ``host``: the guest running PostgreSQL (its address is used)."""
    container: DatabaseContainer | None = None
    """PostgreSQL runs in this container on ``host``/``guest`` (then the SSH target
    where ``docker exec`` runs; ``host: localhost``: this worker)."""
    port: Port = 5432
    dbname: PgIdent | None = None
    """Default: ``name``."""
    user: PgIdent = "postgres"
    password: Secret | None = None
    """None: no password (peer/trust or a client certificate)."""
    sslmode: SslMode = "prefer"
    sslrootcert: AbsPath | None = None
    repository: Name | None = None
    """Default: the only repository, when there is exactly one."""
    format: Literal["plain", "custom"] = "plain"
    """plain deduplicates best in restic (see issue 4)."""
    site: SiteName | None = None
    """The site whose worker backs it up (``settings.sites``); default: the default site."""
    globals: bool = True
    """Also back up ``pg_dumpall --globals-only`` for this server."""
    schedule: Cron = "0 2 * * *"
    timeout_minutes: Minutes = 240
    drill: DatabaseDrill = DatabaseDrill(enabled=False)

    @property
    def effective_dbname(self) -> str:
        return self.dbname or self.name

    @model_validator(mode="after")
    def _where(self) -> Database:
        _exactly_one(self, ("host", "guest"), "database location")
        if self.sslrootcert is not None and self.sslmode not in ("verify-ca", "verify-full"):
            raise ValueError("sslrootcert needs sslmode verify-ca or verify-full")
        return self


# ---- cross-references ----------------------------------------------------------------


def check_database_names(x: CrossCheck) -> None:
    x.unique("databases", x.v.databases, "name", "database name")


def check_databases(x: CrossCheck) -> None:
    drill_servers = x.known["drill_server"] | {LOCAL_DRILL_SERVER}
    for i, db in x.v.databases:
        check_guest_ref(x, ("databases", i, "guest"), db.guest,
                        "ssh" if db.container is not None else "address")
        if db.container is not None and db.host is not None \
                and db.host not in x.ssh_names and db.host != LOCAL_DOCKER_HOST:
            x.add(("databases", i, "host"),
                  unknown("SSH host", db.host, x.ssh_names, "hosts or guests with ssh")
                  + f" (with container, host names where docker runs; "
                    f"{LOCAL_DOCKER_HOST!r}: this worker)")
        if "repository" not in x.v.bad_fields(("databases", i)):
            check_repo(x, ("databases", i, "repository"), db.repository)
        server = db.drill.server if db.drill is not None else None
        if server is not None and server not in drill_servers:
            x.add(("databases", i, "drill", "server"),
                  unknown("drill server", server, drill_servers, "drills.servers"))
