"""Where a database backup reads from: its connection (the server's container, or
the installed client matching its major version) and its server's label."""

from __future__ import annotations

from labkeeper import pg_client, pg_container, postgres
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Database, Inventory
from labkeeper.pg_backup.results import BackupFailed
from labkeeper.secrets import resolve


def conn_for(inv: Inventory, db: Database, *, dbname: str | None = None) -> postgres.Conn:
    if db.container is not None:  # the tools run in the server's container
        return pg_container.container_conn(inv, db, dbname=dbname)
    host, port = inv.database_address(db)
    return postgres.Conn(host=host, port=port, dbname=dbname or db.effective_dbname,
                         user=db.user, password=resolve(db.password) if db.password else None,
                         sslmode=db.sslmode,
                         sslrootcert=str(db.sslrootcert) if db.sslrootcert else None)


def client_conn(inv: Inventory, db: Database, *, dbname: str | None = None) -> postgres.Conn:
    """:func:`conn_for` with client tools that can dump this server: the container's
    own, or the installed client matching the server's major version. Fails before
    anything is dumped (:class:`BackupFailed`) when none is installed (the message
    names the package). A server that cannot be asked now gets the default client:
    opening the snapshot then fails and says why, as it always did."""
    conn = conn_for(inv, db, dbname=dbname)
    try:
        return pg_container.matching(conn)
    except pg_client.ClientMissing as exc:
        raise BackupFailed(f"backup of {db.name} failed before dumping: {exc}",
                           transient=False, database=db.name) from None
    except LabkeeperError:
        return conn


def server_label(inv: Inventory, db: Database) -> str:
    """``host:port`` of a database's server (globals are per server)."""
    _host, port = inv.database_address(db)
    return f"{inv.database_server(db)}:{port}"

