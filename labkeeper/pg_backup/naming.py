"""How a PostgreSQL backup is named in the repository: attempt ids and tags, the
stable tags of a database's series and of a server's globals, file names.

Snapshots: ``--host <lab name>``; tags ``labkeeper``, ``db:<server>/<name>``,
``kind:pg_dump`` | ``kind:pg_manifest``, ``backup:<id>``. A *series* is a lab host
plus the stable tags; the per-run ``backup:`` tag never splits it.
"""

from __future__ import annotations

import secrets as pysecrets
from datetime import UTC, datetime

from labkeeper import restic


def new_backup_id(now: datetime | None = None) -> str:
    """A unique id per backup attempt: ``20260101T020000Z-1a2b3c``."""
    now = now or datetime.now(tz=UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{pysecrets.token_hex(3)}"


def backup_tag(backup_id: str) -> str:
    return f"backup:{backup_id}"


def series_tags(server: str, name: str, kind: str = "pg_dump") -> list[str]:
    """The stable tags of one database's series (kind ``pg_dump`` or ``pg_manifest``)."""
    return ["labkeeper", f"db:{server}/{name}", f"kind:{kind}"]


def globals_tags(server_label: str) -> list[str]:
    return ["labkeeper", f"server:{server_label}", "kind:pg_globals"]


def dump_filename(name: str, fmt: str = "plain") -> str:
    return f"{name}.sql" if fmt == "plain" else f"{name}.dump"


def manifest_filename(name: str) -> str:
    return f"{name}.manifest.json"


def backup_id_of(snapshot: restic.Snapshot) -> str | None:
    for t in snapshot.tags:
        if t.startswith("backup:"):
            return t[len("backup:"):]
    return None

