"""The inventory's sslrootcert reaches libpq (it was accepted and then ignored)."""

from labkeeper import postgres
from labkeeper.inventory import Inventory
from labkeeper.pg_backup import conn_for

LAB = {
    "version": 1,
    "lab": {"name": "t"},
    "repositories": [{"name": "r", "url": "/srv/restic", "password": "env:RP"}],
    "databases": [{"name": "app", "host": "db.example.org", "sslmode": "verify-full",
                   "sslrootcert": "/etc/labkeeper/pg-ca.crt"}],
}


def test_a_database_with_sslrootcert_hands_libpq_its_ca_file():
    inv = Inventory.model_validate(LAB)
    env = conn_for(inv, inv.databases[0]).env()
    assert env["PGSSLMODE"] == "verify-full"
    assert env["PGSSLROOTCERT"] == "/etc/labkeeper/pg-ca.crt"


def test_a_connection_without_sslrootcert_leaves_libpq_its_default():
    assert "PGSSLROOTCERT" not in postgres.Conn("h", 5432, "d", "u").env()
