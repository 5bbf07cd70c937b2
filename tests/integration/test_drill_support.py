"""Shared set-up for the DR drill integration tests (imported by their modules).

Our own moto S3 server and restic repositories (destructive tests corrupt packs in
them, never in the session lab's), the session lab's PostgreSQL as the database
and the drill server, and inventories that are modified copies of the lab's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from labkeeper import b2, pg_backup, process, restic
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.locallab.lab import write_secret
from labkeeper.locallab.s3 import LocalS3
from tests.fixtures.restic_keys import cheap_key

SERVER = "127.0.0.1"
LAB = "local-lab"
SMOKE = [{"name": "users exist", "sql": "SELECT count(*) FROM users", "min": 1},
         {"name": "first user", "sql": "SELECT email FROM users WHERE id = 1",
          "equals": "user1@example.org"}]


class DrillEnv:
    """A moto S3 server of our own; one restic repository per bucket."""

    def __init__(self, lab: Any, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.sec = workdir / "secrets"
        self.s3 = LocalS3(workdir / "s3", bucket="drill-repo")
        self.s3.start()
        write_secret(self.sec / "s3-key-id", self.s3.access_key_id)
        write_secret(self.sec / "s3-secret", self.s3.secret_access_key)
        self._n = 0

    def stop(self) -> None:
        self.s3.stop()

    def target(self, bucket: str) -> b2.S3Target:
        return dataclasses.replace(self.s3.target(), bucket=bucket)

    def new_repo(self, bucket: str) -> tuple[restic.Repo, Path]:
        """A fresh bucket with a restic repository; (repo, password file)."""
        if bucket != self.s3.bucket:
            b2.create_bucket(self.target(bucket))
        pw = secrets.token_urlsafe(18)
        pw_file = write_secret(self.sec / f"restic-{bucket}", pw)
        repo = restic.Repo(url=f"s3:{self.s3.endpoint}/{bucket}/restic",
                           password=SecretStr(pw),
                           aws_access_key_id=SecretStr(self.s3.access_key_id),
                           aws_secret_access_key=SecretStr(self.s3.secret_access_key))
        restic.init(repo, timeout=120)
        cheap_key(repo)
        return repo, pw_file

    def inventory(self, bucket: str, pw_file: Path, *, databases: list[dict] | None = None,
                  drills: dict | None = None, extra: dict | None = None,
                  state: str = "") -> Path:
        """A copy of the lab inventory using our bucket's repository and a drill server
        on the lab's PostgreSQL (as the lab's app role, which may CREATEDB)."""
        inv = yaml.safe_load(self.lab.inventory_path.read_text())
        # Only the databases are drilled here: drop the demo's guests, apps and jobs.
        for demo_only in ("guests", "roles", "apps", "vzdump_jobs", "path_backups"):
            inv.pop(demo_only, None)
        pg = self.lab.postgres
        repo = inv["repositories"][0]
        repo["url"] = f"s3:{self.s3.endpoint}/{bucket}/restic"
        repo["password"] = f"file:{pw_file}"
        repo["s3"] = {"endpoint": self.s3.endpoint, "bucket": bucket, "region": self.s3.region,
                      "access_key_id": f"file:{self.sec / 's3-key-id'}",
                      "secret_access_key": f"file:{self.sec / 's3-secret'}"}
        inv["settings"]["state_dir"] = str(self.workdir / f"state-{bucket}{state}")
        base = next(d for d in inv["databases"] if d["name"] == "appdb")
        inv["databases"] = [{**copy.deepcopy(base), **d} for d in (databases or [
            {"name": "appdb", "drill": drill_spec()}])]
        inv["drills"] = {"servers": [{"name": "lab-pg", "host": pg.host, "port": pg.port,
                                      "user": pg.app_user, "password": base["password"]}],
                         **(drills or {})}
        inv.update(extra or {})
        self._n += 1
        path = self.workdir / f"lab-{bucket}-{self._n}.yaml"
        path.write_text(yaml.safe_dump(inv, sort_keys=False))
        return path


def drill_spec(**kw: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"enabled": True, "server": "lab-pg", "rpo_hours": 26,
                            "rto_minutes": 30, "smoke_queries": SMOKE}
    spec.update(kw)
    return spec


def with_drill(inv: Inventory, name: str, **update: Any) -> Inventory:
    """The inventory with database ``name``'s drill settings changed (no file needed)."""
    dbs = [d.model_copy(update={"drill": d.drill.model_copy(update=update)})
           if d.name == name else d for d in inv.databases]
    return inv.model_copy(update={"databases": dbs})


def scratch_databases(lab: Any) -> list[str]:
    out = lab.postgres.psql_super(
        "SELECT datname FROM pg_database WHERE datname LIKE 'labkeeper\\_drill\\_%';")
    return [line.strip() for line in out.splitlines() if line.strip()]


def forge_backup(inv: Inventory, name: str, workdir: Path, *, source: str = "appdb",
                 truncate_to: int | None = None,
                 edit: Any = None) -> pg_backup.Manifest:
    """A backup of series ``name`` made by hand, bypassing the backup guard: the dump of
    ``source``'s latest backup (optionally cut to ``truncate_to`` bytes with
    ``head -c N | restic backup --stdin``) and a manifest (optionally edited)."""
    repo = pg_backup.open_repo(inv, inv.repository_for(inv.database(name)).name)
    src = pg_backup.find_latest_backup(repo, lab=LAB, server=SERVER, name=source)
    assert src is not None, f"no backup of {source} to forge from"
    manifest = pg_backup.read_manifest(repo, src)
    assert manifest.dump is not None
    dump = workdir / f"{source}-{secrets.token_hex(3)}.sql"
    fd = os.open(dump, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        restic.run_restic(repo, restic.dump_argv(repo, src.dump.id, manifest.dump.path),
                          timeout=120, stdout_fd=fd)
    finally:
        os.close(fd)
    size = dump.stat().st_size if truncate_to is None else truncate_to
    bid = pg_backup.new_backup_id()
    tags = [*pg_backup.series_tags(SERVER, name), pg_backup.backup_tag(bid)]
    filename = pg_backup.dump_filename(name, manifest.dump_format)
    res = process.pipeline(
        [("head", "-c", str(size), str(dump)),
         process.Stage(restic.backup_stdin_argv(repo, filename=filename, host=LAB, tags=tags),
                       codes=restic.EXIT_CODES, env=repo.env())],
        timeout=120)
    dump.unlink()
    summary = restic.parse_backup_summary(res.stdout)
    forged = manifest.model_copy(update={
        "backup_id": bid, "database": name,
        "dump": manifest.dump.model_copy(update={
            "filename": filename, "path": f"/{filename}", "bytes": size,
            "snapshot_id": summary.snapshot_id})})
    if edit is not None:
        forged = edit(forged)
    restic.backup_bytes(repo, forged.to_json(), filename=pg_backup.manifest_filename(name),
                        host=LAB, tags=[*pg_backup.series_tags(SERVER, name, "pg_manifest"),
                                        pg_backup.backup_tag(bid)])
    return forged


def load(path: Path) -> Inventory:
    return load_inventory(path)


@pytest.fixture(scope="session", name="drill_env")
def drill_env_fixture(lab, tmp_path_factory: pytest.TempPathFactory):
    """One moto S3 server for every drill test module (a bucket per repository)."""
    e = DrillEnv(lab, tmp_path_factory.mktemp("drill"))
    try:
        yield e
    finally:
        e.stop()


FAULTS = ("fault-count", "fault-trunc", "fault-trunc-kept", "never-backed-up")


@pytest.fixture(scope="session", name="backed_up")
def backed_up_fixture(drill_env: DrillEnv) -> tuple[DrillEnv, Path, Path]:
    """Bucket ``drill-db``: globals and one real backup of ``appdb`` (drill enabled),
    plus database entries for the forged-fault series (drills disabled).
    Returns (env, inventory path, restic password file)."""
    e = drill_env
    _repo, pw = e.new_repo("drill-db")
    dbs = [{"name": "appdb", "drill": drill_spec()}]
    dbs += [{"name": n, "drill": drill_spec(enabled=False)} for n in FAULTS]
    path = e.inventory("drill-db", pw, databases=dbs, drills={"repository": {"enabled": False}})
    inv = load_inventory(path)
    pg_backup.backup_globals(inv, pg_backup.server_label(inv, inv.database("appdb")),
                             ["appdb"])
    pg_backup.backup_database(inv, "appdb")
    return e, path, pw


def corrupt_largest_pack(env: DrillEnv, bucket: str) -> str:
    """Flip bytes in the middle of the repository's largest data pack (through S3)."""
    s3 = b2.client(env.target(bucket))
    objs = s3.list_objects_v2(Bucket=bucket, Prefix="restic/data/")["Contents"]
    key = max(objs, key=lambda o: o["Size"])["Key"]
    data = bytearray(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    s3.put_object(Bucket=bucket, Key=key, Body=bytes(data))
    return key
