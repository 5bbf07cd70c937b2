"""A scratch PostgreSQL cluster on this host: a restored data directory, started as
the ``postgres`` user (when we are root) on a private socket directory, never a port on
the network (``listen_addresses = ''``). Stopped by ``pg_ctl stop``; removed with its
directory. Nothing here touches a running server's data directory: the directory must
be new (or empty).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from labkeeper import postgres, process
from labkeeper.pitr import PitrError

PG_ROOT = Path("/usr/lib/postgresql")
SOCKET_USER = "postgres"


def bindir_for(major: int, root: Path = PG_ROOT) -> Path:
    path = root / str(major) / "bin"
    if not (path / "postgres").exists():
        raise PitrError(f"PostgreSQL {major} server binaries are not installed here "
                        f"({path}/postgres missing): install postgresql-{major} to restore "
                        "this server's base backup")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(argv: tuple[str, ...]) -> tuple[str, ...]:
    """``argv`` run as the postgres user when we are root (initdb/postgres refuse root)."""
    if os.geteuid() == 0:
        return ("runuser", "-u", SOCKET_USER, "--", *argv)
    return argv


def hand_over(path: Path) -> None:
    """Make a tree the postgres user's (when we are root)."""
    if os.geteuid() != 0:
        return
    pg = pwd.getpwnam(SOCKET_USER)
    for root, dirs, files in os.walk(path):
        os.chown(root, pg.pw_uid, pg.pw_gid)
        for n in (*dirs, *files):
            os.lchown(os.path.join(root, n), pg.pw_uid, pg.pw_gid)


def new_workdir(path: Path) -> Path:
    """A fresh directory for a restore; refuses one that holds anything."""
    if path.exists() and any(path.iterdir()):
        raise PitrError(f"{path} is not empty: a point-in-time restore goes into a new "
                        "directory only, never over existing data")
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o755)  # noqa: S103 - postgres must traverse; the data dir inside is 0700
    traversable(path)
    return path


def traversable(path: Path) -> None:
    """Let the postgres user walk down to ``path`` (o+x on each parent, when root)."""
    if os.geteuid() != 0:
        return
    for parent in path.parents:
        mode = parent.stat().st_mode
        if parent != Path("/") and not mode & 0o001:
            os.chmod(parent, mode | 0o001)


@dataclass
class ScratchCluster:
    workdir: Path
    bindir: Path
    port: int
    superuser: str = "postgres"

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def sockdir(self) -> Path:
        return self.workdir / "sock"

    @property
    def logfile(self) -> Path:
        return self.workdir / "postgres.log"

    def start(self) -> None:
        """Start without waiting (recovery may take long; the caller watches the log)."""
        self.logfile.touch()
        hand_over(self.workdir)
        traversable(self.workdir)
        process.run(as_postgres((str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                                 "-l", str(self.logfile), "-W", "start")), timeout=60)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        res = process.run(as_postgres((str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                                       "status")), timeout=30, check=False,
                          codes=process.ExitCodeTable("pg_ctl", {
                              0: process.ExitCode("running", "ok"),
                              3: process.ExitCode("not running", "ok"),
                              4: process.ExitCode("no data directory", "ok")}))
        return res.returncode == 0

    def query(self, sql: str, *, db: str = "postgres", timeout: float = 120) -> list[list[str]]:
        conn = postgres.Conn(host=str(self.sockdir), port=self.port, dbname=db,
                             user=self.superuser, client=postgres.Client(bindir=str(self.bindir)))
        res = process.run(as_postgres(postgres.psql_argv(conn)), timeout=timeout,
                          codes=postgres.PSQL_CODES, env=conn.env(), input=sql)
        return postgres.parse_csv(res.stdout)

    def stop(self) -> None:
        if not (self.datadir / "postmaster.pid").exists():
            return
        process.run(as_postgres((str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                                 "-m", "immediate", "-w", "-t", "60", "stop")),
                    timeout=90, check=False)

    def destroy(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.workdir)
