"""Point-in-time recovery for PostgreSQL: base backups and continuous WAL in restic.

- :mod:`~labkeeper.pitr.models`: LSNs, segment names, tags, records (pure).
- :mod:`~labkeeper.pitr.target`: where a server's base backups and WAL go (inventory → targets).
- :mod:`~labkeeper.pitr.basebackup`: ``pg_basebackup`` streamed into ``restic backup --stdin``.
- :mod:`~labkeeper.pitr.wal`: the spool, the ``pg_receivewal`` supervisor, shipping.
- :mod:`~labkeeper.pitr.restore`: restore to a time or LSN in a scratch data directory.
- :mod:`~labkeeper.pitr.copy`: one recovered database copied onto a live or drill server
  (``pg_dump | pg_restore``), the runbook's swap and its compensations.
- :mod:`~labkeeper.pitr.drill`, :mod:`~labkeeper.pitr.retention`, :mod:`~labkeeper.pitr.lag`.
"""

from __future__ import annotations

from labkeeper.errors import LabkeeperError


class PitrError(LabkeeperError):
    """A PITR step failed; the message says what and, for WAL, which segment."""
