"""Where a database's client tools run: in the server's container, or a matching
client on this worker (issues 17 item 6 and 23 item 2).

Containerised PostgreSQL (``container:`` in the inventory)
    Most Compose apps keep PostgreSQL in their own container with no published
    port (Immich's ``immich_postgres``). Its tools run *in* that container,
    ``docker [--host H] exec -i -u postgres -e PGPASSWORD ... CONTAINER pg_dump
    ...``, so client and server always match. On a guest or SSH host, that argv
    runs through the SSH bridge (:mod:`labkeeper.sshpipe`): a local process that
    *is* the remote command, so it stands in :func:`labkeeper.process.pipeline`
    exactly where a local ``pg_dump`` would, and the backup keeps all its
    guarantees (exported snapshot, row counts in it, the end-of-stream gate: a
    cut stream — the exec killed, the container stopped, the connection lost —
    never reaches restic's end-of-stream).

    Secrets: ``-e NAME`` carries names only; ``docker`` takes each value from its
    own environment, which the SSH runner sets from the channel's stdin
    (:data:`labkeeper.ssh.ENV_PREAMBLE`). No value is ever in an argv, here or
    on the remote host. Normally no password is needed at all: ``-u postgres``
    on the container's socket is trusted (peer/trust), as in the official image.

A matching client for a server over TCP
    :func:`labkeeper.pg_client.with_matching_client` asks the server its version and
    picks ``<bin root>/<major>/bin`` (the same major, else the newest newer one);
    none fits: :class:`labkeeper.pg_client.ClientMissing`, naming the package.
"""

from __future__ import annotations

from dataclasses import replace

from labkeeper import pg_client, postgres, sshpipe
from labkeeper.errors import ConfigError
from labkeeper.inventory import (
    LOCAL_DOCKER_HOST,
    Database,
    DatabaseContainer,
    DrillServer,
    Inventory,
)
from labkeeper.secrets import resolve

BRIDGE_MARGIN_S = 120.0
"""The SSH bridge's own deadline trails the job's timeout by this much (the job's
pipeline deadline is the one that acts)."""


def docker_exec_prefix(container: DatabaseContainer, *, docker: str = "docker"
                       ) -> tuple[str, ...]:
    """``docker [--host H] exec -i -u USER -e PGPASSWORD ... CONTAINER`` (pure): names,
    never values."""
    argv: tuple[str, ...] = (docker,)
    if container.docker_host:
        argv += ("--host", container.docker_host)
    argv += ("exec", "-i", "-u", container.exec_user)
    for name in postgres.PG_ENV_NAMES:
        argv += ("-e", name)
    return (*argv, container.name)


def container_client(inv: Inventory, container: DatabaseContainer, *, host: str | None,
                     guest: str | None, timeout: float) -> postgres.Client:
    """The client of a containerised server: ``docker exec`` here (``host:
    localhost``) or through the SSH bridge to the host or guest."""
    prefix = docker_exec_prefix(container)
    location = guest or host
    if location is None:
        raise ConfigError(f"container {container.name}: set host or guest (where docker runs)")
    if guest is None and host == LOCAL_DOCKER_HOST and host not in inv.ssh_targets():
        return postgres.Client(prefix=prefix, where=f"container {container.name} here")
    from labkeeper import ssh

    target = ssh.SshTarget.from_spec(inv.ssh_target(location))
    bridge = sshpipe.bridge_prefix(env_names=postgres.PG_ENV_NAMES,
                                   timeout=timeout + BRIDGE_MARGIN_S)
    return postgres.Client(prefix=(*bridge, *prefix),
                           env=tuple(sshpipe.bridge_env(target).items()),
                           where=f"container {container.name} on {location}")


def container_conn(inv: Inventory, db: Database, *, dbname: str | None = None
                   ) -> postgres.Conn:
    """The connection of a containerised database, its tools run in the container."""
    assert db.container is not None
    client = container_client(inv, db.container, host=db.host, guest=db.guest,
                              timeout=db.timeout_minutes * 60)
    return postgres.Conn(host=db.container.pghost, port=db.port,
                         dbname=dbname or db.effective_dbname, user=db.user,
                         password=resolve(db.password) if db.password else None,
                         sslmode=db.sslmode, client=client)


def drill_container_conn(inv: Inventory, server: DrillServer, *, dbname: str | None,
                         timeout: float) -> postgres.Conn:
    assert server.container is not None
    client = container_client(inv, server.container, host=server.host, guest=server.guest,
                              timeout=timeout)
    return postgres.Conn(host=server.container.pghost, port=server.port,
                         dbname=dbname or server.maintenance_db, user=server.user,
                         password=resolve(server.password) if server.password else None,
                         sslmode=server.sslmode, client=client)


def matching(conn: postgres.Conn) -> postgres.Conn:
    """``conn`` ready to use: a container's own tools as they are; over TCP, the
    installed client matching the server (:func:`pg_client.with_matching_client`)."""
    if conn.client.prefix:
        return conn
    return pg_client.with_matching_client(conn)


def server_major(conn: postgres.Conn) -> int:
    """The server's major version (known already when the client was matched)."""
    if conn.client.server_major is not None:
        return conn.client.server_major
    return pg_client.major_of(pg_client.server_version_num(conn))


def with_major(conn: postgres.Conn, major: int) -> postgres.Conn:
    return replace(conn, client=replace(conn.client, server_major=major))


def major_of_version(version: str) -> int | None:
    """``17.12 (Debian 17.12-0+deb13u1)`` -> 17; ``9.6.24`` -> 9; None if unreadable."""
    head = version.strip().split(" ", 1)[0].split(".", 1)[0]
    return int(head) if head.isdigit() else None


def restore_target_problem(dump_server_version: str, target_major: int) -> str | None:
    """Why a dump of a server of ``dump_server_version`` should not be restored into
    a server of major ``target_major`` (pure): a dump of a newer server may use
    syntax an older one rejects (PostgreSQL 17's ``SET transaction_timeout``)."""
    source = major_of_version(dump_server_version)
    if source is not None and source > target_major:
        return (f"the dump comes from PostgreSQL {source}, the restore target runs "
                f"PostgreSQL {target_major}: restore into a server of version {source} "
                "or newer")
    return None


def check_restore_target(dump_server_version: str, conn: postgres.Conn, label: str
                         ) -> postgres.Conn:
    """``conn`` with its server's major known; raises :class:`ConfigError` when the
    dump cannot be restored there (:func:`restore_target_problem`)."""
    major = server_major(conn)
    problem = restore_target_problem(dump_server_version, major)
    if problem:
        raise ConfigError(f"{label}: {problem}")
    return with_major(conn, major)
