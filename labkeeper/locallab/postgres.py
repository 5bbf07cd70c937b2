"""A throwaway PostgreSQL cluster on a loopback port, with seeded sample databases.

Runs Debian's PostgreSQL binaries as the ``postgres`` user (``initdb`` refuses
root) in a private directory; ``fsync=off`` for speed. Clients connect over TCP
on 127.0.0.1 with SCRAM passwords (what production looks like), the lab
superuser over the private Unix socket.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets as pysecrets
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

from labkeeper import process
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import stop_pid
from labkeeper.secrets import register

PG_ROOT = Path("/usr/lib/postgresql")
_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

SAMPLE_SQL = {
    # A small SaaS-like app: users, projects, invoices, an audit log.
    "appdb": """
CREATE TABLE users (
    id bigserial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    display_name text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    is_admin boolean NOT NULL DEFAULT false
);
CREATE TABLE projects (
    id bigserial PRIMARY KEY,
    owner_id bigint NOT NULL REFERENCES users(id),
    name text NOT NULL,
    settings jsonb NOT NULL DEFAULT '{}'
);
CREATE TABLE invoices (
    id bigserial PRIMARY KEY,
    project_id bigint NOT NULL REFERENCES projects(id),
    amount_cents integer NOT NULL CHECK (amount_cents >= 0),
    issued_on date NOT NULL,
    paid boolean NOT NULL DEFAULT false
);
CREATE TABLE audit_log (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL,
    actor_id bigint REFERENCES users(id),
    action text NOT NULL,
    detail text
);
CREATE INDEX invoices_project_idx ON invoices(project_id);
CREATE INDEX audit_log_at_idx ON audit_log(at);
CREATE VIEW unpaid AS SELECT project_id, sum(amount_cents) AS due FROM invoices
    WHERE NOT paid GROUP BY project_id;
INSERT INTO users (email, display_name, is_admin)
    SELECT 'user' || i || '@example.org', 'User ' || i, i = 1 FROM generate_series(1, 500) i;
INSERT INTO projects (owner_id, name, settings)
    SELECT 1 + (i % 500), 'project-' || i, jsonb_build_object('tier', i % 3)
    FROM generate_series(1, 1200) i;
INSERT INTO invoices (project_id, amount_cents, issued_on, paid)
    SELECT 1 + (i % 1200), (i * 37) % 100000, date '2024-01-01' + (i % 700), i % 4 <> 0
    FROM generate_series(1, 8000) i;
INSERT INTO audit_log (at, actor_id, action, detail)
    SELECT timestamptz '2024-01-01' + i * interval '7 minutes', 1 + (i % 500),
           (ARRAY['login','update','delete','export'])[1 + i % 4], repeat(md5(i::text), 3)
    FROM generate_series(1, 20000) i;
""",
    # A photo-library-like database (Immich-shaped).
    "photos": """
CREATE TABLE albums (id uuid PRIMARY KEY, title text NOT NULL, created timestamptz NOT NULL);
CREATE TABLE assets (
    id uuid PRIMARY KEY,
    album_id uuid REFERENCES albums(id),
    original_path text NOT NULL,
    checksum bytea NOT NULL,
    taken_at timestamptz,
    exif jsonb
);
CREATE INDEX assets_album_idx ON assets(album_id);
INSERT INTO albums SELECT md5('album' || i)::uuid, 'Album ' || i, now() - i * interval '3 days'
    FROM generate_series(1, 60) i;
INSERT INTO assets SELECT md5('asset' || i)::uuid, md5('album' || (1 + i % 60))::uuid,
    '/mnt/photos/' || (2015 + i % 10) || '/IMG_' || lpad(i::text, 5, '0') || '.jpg',
    decode(md5(i::text), 'hex'), timestamptz '2015-01-01' + i * interval '5 hours',
    jsonb_build_object('iso', 100 * (1 + i % 8), 'camera', 'Model ' || (i % 5))
    FROM generate_series(1, 6000) i;
""",
}


def pg_bindir() -> Path:
    """Directory of the newest installed PostgreSQL server binaries."""
    versions = sorted(
        (p for p in PG_ROOT.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not versions:
        raise RuntimeError(
            "PostgreSQL server binaries not found under /usr/lib/postgresql "
            "(apt-get install postgresql; `make setup` does it)"
        )
    return versions[-1]


@dataclass(frozen=True)
class PgDatabase:
    name: str
    user: str
    password_file: Path


class LocalPostgres:
    """initdb + start on a free loopback port; stop by the postmaster's PID."""

    def __init__(self, workdir: Path, *, databases: tuple[str, ...] = ("appdb", "photos"),
                 app_user: str = "labkeeper") -> None:
        self.workdir = workdir
        self.datadir = workdir / "data"
        self.sockdir = workdir / "sock"
        self.logfile = workdir / "postgres.log"
        self.host = "127.0.0.1"
        self.port = 0
        for ident in (*databases, app_user):
            if not _IDENT.match(ident):
                raise ValueError(f"not a plain SQL identifier: {ident!r}")
        self.database_names = databases
        self.app_user = app_user
        self.password_file = workdir / "app-password"
        self.bindir = pg_bindir()
        self.version = ""

    # -- helpers ---------------------------------------------------------------------
    def _as_postgres(self, *argv: str) -> tuple[str, ...]:
        return ("runuser", "-u", "postgres", "--", *argv)

    def psql_super(self, sql: str, *, db: str = "postgres", timeout: float = 60) -> str:
        """Run SQL as the cluster superuser over the private socket (lab set-up only)."""
        res = process.run(
            self._as_postgres(str(self.bindir / "psql"), "-X", "-q", "-A", "-t",
                              "-v", "ON_ERROR_STOP=1", "-h", str(self.sockdir),
                              "-p", str(self.port), "-d", db, "-f", "-"),
            timeout=timeout, input=sql,
        )
        return res.stdout

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        pg = pwd.getpwnam("postgres")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sockdir.mkdir(exist_ok=True)
        for p in (self.workdir, self.sockdir):
            os.chown(p, pg.pw_uid, pg.pw_gid)
        os.chmod(self.workdir, 0o755)  # noqa: S103 - postgres must traverse; secrets inside are 0600
        # The walk from / to workdir must be traversable by postgres.
        for parent in self.workdir.parents:
            mode = parent.stat().st_mode
            if parent != Path("/") and not mode & 0o001:
                os.chmod(parent, mode | 0o001)
        self.port = free_port()
        if not (self.datadir / "PG_VERSION").exists():
            process.run(
                self._as_postgres(str(self.bindir / "initdb"), "-D", str(self.datadir),
                                  "-U", "postgres", "--auth-local=trust",
                                  "--auth-host=scram-sha-256", "-E", "UTF8",
                                  "--locale=C.UTF-8", "--no-instructions"),
                timeout=120,
            )
        conf = (
            f"port = {self.port}\n"
            f"listen_addresses = '{self.host}'\n"
            f"unix_socket_directories = '{self.sockdir}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
            "max_connections = 40\nshared_buffers = 32MB\n"
        )
        auto = self.datadir / "postgresql.auto.conf"
        auto.write_text(conf)
        os.chown(auto, pg.pw_uid, pg.pw_gid)
        process.run(
            self._as_postgres(str(self.bindir / "pg_ctl"), "-D", str(self.datadir),
                              "-l", str(self.logfile), "-w", "-t", "60", "start"),
            timeout=90,
        )
        wait_for_port(self.host, self.port, timeout=30)
        self.version = self.psql_super("SHOW server_version;").strip()
        self._seed()

    def _seed(self) -> None:
        if self.password_file.exists():
            password = self.password_file.read_text().strip()
        else:
            password = pysecrets.token_urlsafe(18)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
        register(password)
        exists = self.psql_super(
            f"SELECT 1 FROM pg_roles WHERE rolname = '{self.app_user}';"  # noqa: S608 - checked identifier
        ).strip()
        if not exists:
            # The password goes through stdin, never argv; psql's :'var' quotes it.
            self.psql_super(
                f"\\set pw '{_sql_literal_body(password)}'\n"
                f"CREATE ROLE {self.app_user} LOGIN CREATEDB PASSWORD :'pw';\n"
            )
        for db in self.database_names:
            has = self.psql_super(
                f"SELECT 1 FROM pg_database WHERE datname = '{db}';"  # noqa: S608 - checked identifier
            ).strip()
            if has:
                continue
            self.psql_super(f"CREATE DATABASE {db} OWNER {self.app_user};")
            sql = SAMPLE_SQL.get(db, "CREATE TABLE items (id serial PRIMARY KEY, v text);")
            self.psql_super(f"SET ROLE {self.app_user};\n{sql}\nANALYZE;", db=db, timeout=120)

    def postmaster_pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            return int(pidfile.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.postmaster_pid()
        if pid is None:
            return
        # postmaster is not our child (pg_ctl daemonised it): stop it by PID.
        # SIGINT is PostgreSQL's "fast" shutdown (SIGTERM would wait for clients).
        stop_pid(pid, grace=20, group=False, first_signal=signal.SIGINT)

    def destroy(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.workdir)


def _sql_literal_body(value: str) -> str:
    """Body of a single-quoted literal for psql's \\set (token_urlsafe has no quotes)."""
    if "'" in value or "\\" in value or "\n" in value:
        raise ValueError("password contains characters this lab helper does not quote")
    return value
