"""Shared set-up for the PITR integration tests: a PostgreSQL 15 cluster of its own (the
role gets REPLICATION), a moto S3 + restic repository of its own (the tests freeze it),
an inventory with a ``pitr:`` section, a supervised receiver, and a writer committing
timestamped rows one by one."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import yaml

from labkeeper import postgres
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.locallab.lab import LocalLab
from labkeeper.locallab.postgres import LocalPostgres
from labkeeper.pitr import target as pitr_target
from labkeeper.pitr import wal
from tests.fixtures.restic_keys import cheap_key

SERVER = "pg1"
DB = "pitrdb"


def wait_until(cond: Callable[[], object], timeout: float, what: str,
               every: float = 0.1) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class PitrLab:
    lab: LocalLab
    pg: LocalPostgres
    inv: Inventory
    workdir: Path

    def target(self) -> pitr_target.PitrTarget:
        return pitr_target.resolve(self.inv, SERVER)

    def sql(self, text: str) -> list[list[str]]:
        t = self.target()
        return postgres.query(t.conn, text, timeout=60)


def start_pitr_lab(workdir: Path, **pitr: object) -> PitrLab:
    lab = LocalLab(workdir / "lab", postgres=False, s3=True, sshd=False, pvesim=False)
    lab.start()
    try:
        assert lab.repo is not None
        cheap_key(lab.repo)
        pg = LocalPostgres(workdir / "pg", databases=(DB,))
        pg.start()
        lab.postgres = pg
        pg.psql_super("ALTER ROLE labkeeper REPLICATION;")
        pg.psql_super("GRANT EXECUTE ON FUNCTION pg_switch_wal() TO labkeeper;\n"
                      "CREATE TABLE ticks (id bigserial PRIMARY KEY, at timestamptz NOT NULL);\n"
                      "GRANT ALL ON ticks, ticks_id_seq TO labkeeper;", db=DB)
        data = lab.inventory()
        data["pitr"] = [{"name": SERVER, "database": DB, "spool_dir": str(workdir / "spool"),
                         "ship_interval_minutes": 1, **pitr}]
        path = workdir / "lab.yaml"
        path.write_text(yaml.safe_dump(data))
        return PitrLab(lab=lab, pg=pg, inv=load_inventory(path), workdir=workdir)
    except BaseException:
        lab.stop()
        raise


class Receiver:
    """A :class:`wal.WalReceiver` in a thread."""

    def __init__(self, plab: PitrLab) -> None:
        self.sup = wal.WalReceiver(plab.target(), max_backoff=2)
        self.thread = threading.Thread(target=self.sup.run, daemon=True)

    def start(self) -> Receiver:
        self.thread.start()
        wait_until(lambda: self.sup.pid, 60, "pg_receivewal to start")
        return self

    def stop(self) -> None:
        self.sup.stop()
        self.thread.join(30)


@dataclass
class Writer:
    """Commits one row per statement (its own connection each), ``pause`` apart;
    ``rows`` holds (id, clock_timestamp() of the insert) in commit order."""

    plab: PitrLab
    pause: float = 0.05
    rows: list[tuple[int, datetime]] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def _run(self) -> None:
        t = self.plab.target()
        while not self.stop_event.is_set():
            got = postgres.query(t.conn, "INSERT INTO ticks (at) VALUES (clock_timestamp()) "
                                 "RETURNING id, at;", timeout=60)
            self.rows.append((int(got[0][0]), datetime.fromisoformat(got[0][1])))
            self.stop_event.wait(self.pause)

    def start(self) -> Writer:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(60)

    def wait_rows(self, n: int, timeout: float = 120) -> None:
        start = len(self.rows)
        wait_until(lambda: len(self.rows) >= start + n, timeout, f"{n} more rows")
