"""The local lab: real services on loopback ports plus the Proxmox simulator.

One code path serves the pytest fixtures and ``labkeeper demo``: start the
parts, write secrets to 0600 files, write a matching inventory that refers to
them (``file:`` references), and stop everything by PID at the end.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets as pysecrets
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from pydantic import SecretStr

from labkeeper import restic
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.postgres import LocalPostgres
from labkeeper.locallab.s3 import LocalS3
from labkeeper.locallab.services import Service
from labkeeper.secrets import register

log = logging.getLogger("labkeeper.locallab")

PVE_TOKEN_ID = "labkeeper@pve!lab"  # noqa: S105 - an id, not a secret
PVE_NODES = ("pve1", "pve2", "pve3")
SMOKE_QUERIES: dict[str, list[dict[str, Any]]] = {
    "appdb": [{"name": "users exist", "sql": "SELECT count(*) FROM users", "min": 1},
              {"name": "first user", "sql": "SELECT email FROM users WHERE id = 1",
               "equals": "user1@example.org"}],
    "photos": [{"name": "assets exist", "sql": "SELECT count(*) FROM assets", "min": 1}],
}
DEMO_APPS = {"good": 120, "bad": 121}
"""Demo apps (name -> vmid of their guest ``web-<name>``)."""
COMPOSE_GUEST = ("docker1", 130)
COMPOSE_APPS = {"compose-good": "2", "compose-bad": "2-bad"}
"""Compose demo apps on the real engine (name -> the version the registry then offers)."""
PG_CONTAINER = "immich_postgres"
"""The containerised database server of the lab (PostgreSQL 17, no published port)."""
PG_CONTAINER_DB = "immich"
"""Its database (the ``photos`` sample), in the inventory under the same name."""
PG_CONTAINER_DRILL_SERVER = "immich-pg"


def write_secret(path: Path, value: str) -> Path:
    """Write a secret to a file readable only by us (created 0600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    register(value)
    return path


class LocalLab:
    """Start/stop the local lab. Use as a context manager or call start()/stop()."""

    def __init__(self, workdir: Path, *, postgres: bool = True, s3: bool = True,
                 sshd: bool = True, pvesim: bool = True, pve_task_duration: float = 0.2,
                 docker: bool = False, docker_args: tuple[str, ...] = (),
                 db_container: bool | None = None) -> None:
        """``docker``: also start a private Docker engine (``docker_args`` go to dockerd),
        a loopback registry and the app images (:mod:`labkeeper.locallab.docker`); if
        the engine cannot start, the lab runs without it and :attr:`docker_error` says
        why. ``db_container`` (default: ``docker``): on that engine, also run
        PostgreSQL 17 in a container (:data:`PG_CONTAINER`, host networking, nothing
        published) with a seeded database that the inventory reaches by ``docker
        exec`` over SSH; if it cannot start, :attr:`db_container_error` says why."""
        self.docker_args = docker_args
        self.workdir = workdir.resolve()
        self.secrets_dir = self.workdir / "secrets"
        self.inventory_path = self.workdir / "lab.yaml"
        self.want = {"postgres": postgres, "s3": s3, "sshd": sshd, "pvesim": pvesim,
                     "docker": docker,
                     "db_container": docker if db_container is None else db_container}
        self.pve_task_duration = pve_task_duration
        self.postgres: LocalPostgres | None = None
        self.s3: LocalS3 | None = None
        self.sshd: Any = None
        self.pvesim: Any = None
        self.repo: restic.Repo | None = None
        self.pve_token_secret = ""
        self.app_ports: dict[str, int] = {}
        self.app_services: list[Service] = []
        self.docker: Any = None
        self.registry: Any = None
        self.images: Any = None
        self.docker_error: str | None = None
        self.db_container: Any = None
        self.db_container_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> LocalLab:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.want["postgres"]:
                self.postgres = LocalPostgres(self.workdir / "postgres")
                self.postgres.start()
            if self.want["s3"]:
                self.s3 = LocalS3(self.workdir / "s3")
                self.s3.start()
                self._init_repository()
            if self.want["sshd"]:
                from labkeeper.locallab.sshd import LocalSshd

                self.sshd = LocalSshd(self.workdir / "sshd")
                self.sshd.start()
            if self.want["pvesim"]:
                from labkeeper.pvesim import Simulator

                self.pve_token_secret = pysecrets.token_hex(16)
                write_secret(self.secrets_dir / "pve-token", self.pve_token_secret)
                self.pvesim = Simulator(nodes=PVE_NODES,
                                        state_path=self.workdir / "pvesim-state.json",
                                        task_duration=self.pve_task_duration,
                                        tokens={PVE_TOKEN_ID: self.pve_token_secret},
                                        host_paths=True)
                self.pvesim.start(host="127.0.0.1", port=0)
            if self.want["docker"]:
                self._start_docker()
                if self.want["db_container"]:
                    self._start_db_container()
            self._sample_files()
            self.write_inventory()
            self._write_pids()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_docker(self) -> None:
        """The engine, the registry and the app images; on failure the lab goes on
        without them and ``docker_error`` says why."""
        from labkeeper.errors import LabkeeperError
        from labkeeper.locallab.docker import LocalDocker, LocalRegistry
        from labkeeper.locallab.images import build_app_images

        try:
            self.docker = LocalDocker(self.workdir / "docker",
                                      extra_args=self.docker_args).start()
            self.registry = LocalRegistry(self.workdir / "registry").start()
            self.images = build_app_images(self.docker, self.registry,
                                           workdir=self.workdir / "images")
        except (LabkeeperError, OSError) as exc:
            self.docker_error = str(exc)
            log.warning("the Docker engine is not available: %s", exc)
            self._stop_docker()

    def _start_db_container(self) -> None:
        """PostgreSQL 17 in a container on the lab's engine (image from the cache of
        :mod:`labkeeper.locallab.pgimage`), seeded with :data:`PG_CONTAINER_DB`; on
        failure the lab goes on without it and ``db_container_error`` says why."""
        from labkeeper.errors import LabkeeperError
        from labkeeper.locallab import pgimage
        from labkeeper.locallab.postgres import SAMPLE_SQL

        if self.docker is None:
            self.db_container_error = ("no Docker engine: "
                                       f"{self.docker_error or 'not started'}")
            return
        box = pgimage.Pg17Container(self.docker.argv(), name=PG_CONTAINER, port=free_port())
        try:
            box.start()
            box.psql(f"CREATE DATABASE {PG_CONTAINER_DB};")
            box.psql(SAMPLE_SQL["photos"] + "\nANALYZE;", db=PG_CONTAINER_DB)
        except (LabkeeperError, OSError, RuntimeError) as exc:
            self.db_container_error = str(exc)
            log.warning("the PostgreSQL container is not available: %s", exc)
            box.stop()
            return
        self.db_container = box

    def _stop_docker(self) -> None:
        if self.db_container is not None:
            try:
                self.db_container.stop()
            except Exception:
                log.exception("removing the PostgreSQL container failed")
            self.db_container = None
        for name in ("registry", "docker"):
            part = getattr(self, name)
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("stopping %s failed", name)
                setattr(self, name, None)
        self.images = None

    def _sample_files(self) -> None:
        """A small file tree for the demo's path backup."""
        root = self.workdir / "files"
        for i in range(20):
            sub = root / f"album-{i % 4}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"photo-{i:03d}.txt").write_text(f"picture {i}\n" * (50 + i * 10))

    def _init_repository(self) -> None:
        assert self.s3 is not None
        pw = pysecrets.token_urlsafe(24)
        write_secret(self.secrets_dir / "restic-password", pw)
        write_secret(self.secrets_dir / "s3-access-key-id", self.s3.access_key_id)
        write_secret(self.secrets_dir / "s3-secret-access-key", self.s3.secret_access_key)
        self.repo = restic.Repo(
            url=f"s3:{self.s3.endpoint}/{self.s3.bucket}/restic",
            password=SecretStr(pw),
            aws_access_key_id=SecretStr(self.s3.access_key_id),
            aws_secret_access_key=SecretStr(self.s3.secret_access_key),
            cache_dir=str(self.workdir / "restic-cache"),
        )
        restic.init(self.repo, timeout=120)

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.postgres and (pid := self.postgres.postmaster_pid()):
            out["postgres"] = pid
        if self.s3 and self.s3.pid:
            out["s3"] = self.s3.pid
        if self.sshd is not None and getattr(self.sshd, "pid", None):
            out["sshd"] = int(self.sshd.pid)
        if self.docker is not None and self.docker.pid:
            out["dockerd"] = int(self.docker.pid)
        if self.registry is not None and self.registry.pid:
            out["docker-registry"] = int(self.registry.pid)
        return out

    def _write_pids(self) -> None:
        (self.workdir / "pids.json").write_text(json.dumps(self.pids(), indent=2))

    def stop(self) -> None:
        for svc in self.app_services:
            svc.stop()
        self.app_services = []
        self._stop_docker()
        for name in ("pvesim", "sshd", "s3", "postgres"):
            part = getattr(self, name)
            if part is None:
                continue
            try:
                part.stop()
            except Exception:
                log.exception("stopping %s failed", name)
            setattr(self, name, None)
        with contextlib.suppress(FileNotFoundError):
            (self.workdir / "pids.json").unlink()

    def __enter__(self) -> LocalLab:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- the inventory -----------------------------------------------------------------
    def inventory(self) -> dict[str, Any]:
        """The inventory describing this lab (secrets as file: references)."""
        sec = self.secrets_dir
        inv: dict[str, Any] = {
            "version": 1,
            "lab": {"name": "local-lab", "timezone": "UTC"},
            "settings": {"state_dir": str(self.workdir / "state"),
                         # bootstrap markers "on the guests" (the demo's guests are local)
                         "provision": {"guest_state_dir": str(self.workdir / "guest-state")}},
        }
        if self.pvesim is not None:
            inv["proxmox"] = self._proxmox_section()
        if self.sshd is not None:
            inv["ssh"] = {
                "user": self.sshd.user,
                "port": self.sshd.port,
                "key": f"file:{self.sshd.user_key_path}",
                "known_hosts": str(self.sshd.known_hosts_path),
                "trust_on_first_use": False,
            }
            inv["hosts"] = [{"name": "labhost", "address": self.sshd.host,
                             "port": self.sshd.port}]
        if self.pvesim is not None and self.sshd is not None:
            inv.update(self._demo_guests())
        if self.s3 is not None and self.repo is not None:
            inv["repositories"] = [{
                "name": "lab-repo",
                "url": self.repo.url,
                "password": f"file:{sec / 'restic-password'}",
                "s3": {"endpoint": self.s3.endpoint, "bucket": self.s3.bucket,
                       "region": self.s3.region,
                       "access_key_id": f"file:{sec / 's3-access-key-id'}",
                       "secret_access_key": f"file:{sec / 's3-secret-access-key'}"},
                "retention": {"keep_last": 3, "keep_daily": 7, "keep_weekly": 4},
            }]
        if self.postgres is not None:
            self._add_databases(inv)
        if self.db_container is not None and self.sshd is not None and self.repo is not None:
            self._add_db_container(inv)
        return inv

    def _proxmox_section(self) -> dict[str, Any]:
        """The simulated Proxmox cluster: its API, nodes and storages."""
        assert self.pvesim is not None
        return {
            "host": self.pvesim.host,
            "port": self.pvesim.port,
            "token_id": PVE_TOKEN_ID,
            "token_secret": f"file:{self.secrets_dir / 'pve-token'}",
            "tls": {"verify": True, "ca_file": str(self.pvesim.ca_file),
                    "fingerprint": self.pvesim.fingerprint},
            # The lab's sshd stands in for every node's SSH (off-site copies read
            # archives from the node over SFTP).
            "nodes": [{"name": n, **({"address": self.sshd.host,
                                      "ssh_user": self.sshd.user}
                                     if self.sshd is not None else {})}
                      for n in PVE_NODES],
            "storages": [
                {"name": "local", "type": "dir",
                 "content": ["iso", "vztmpl", "backup", "snippets"], "snapshots": False},
                {"name": "local-lvm", "type": "lvmthin", "content": ["images", "rootdir"],
                 "snapshots": True},
            ],
        }

    def _add_databases(self, inv: dict[str, Any]) -> None:
        """The lab's PostgreSQL databases (password written as a file: secret) and the
        drill server they restore into."""
        assert self.postgres is not None
        sec = self.secrets_dir
        write_secret(sec / "pg-password", self.postgres.password_file.read_text().strip())
        inv["databases"] = [
            {"name": db, "host": self.postgres.host, "port": self.postgres.port,
             "dbname": db, "user": self.postgres.app_user,
             "password": f"file:{sec / 'pg-password'}",
             **({"repository": "lab-repo"} if self.repo else {}),
             "drill": {"enabled": True, "server": "lab-pg", "rpo_hours": 26,
                       "rto_minutes": 30, "smoke_queries": SMOKE_QUERIES.get(db, [])}}
            for db in self.postgres.database_names
        ]
        # Drills restore into scratch databases named labkeeper_drill_* on the same
        # server (the lab role may create databases).
        inv["drills"] = {"servers": [{
            "name": "lab-pg", "host": self.postgres.host, "port": self.postgres.port,
            "user": self.postgres.app_user, "password": f"file:{sec / 'pg-password'}"}],
            "repository": {"read_data_period": 1}}

    def _add_db_container(self, inv: dict[str, Any]) -> None:
        """The containerised database, the way an Immich stack keeps it: the dump runs
        as ``docker exec`` in :data:`PG_CONTAINER` on ``labhost`` (the lab's sshd),
        as ``postgres`` on the container's socket (no password, as Immich's own backup
        instructions do); drills restore into scratch databases of the same server."""
        from labkeeper.locallab import pgimage

        box = self.db_container
        container = {"name": box.name, "docker_host": self.docker.host,
                     "pghost": pgimage.SERVER_SOCKDIR}
        inv.setdefault("databases", []).append({
            "name": PG_CONTAINER_DB, "host": "labhost", "port": box.port,
            "dbname": PG_CONTAINER_DB, "user": "postgres", "container": container,
            "repository": "lab-repo",
            "drill": {"enabled": True, "server": PG_CONTAINER_DRILL_SERVER, "rpo_hours": 26,
                      "rto_minutes": 30, "smoke_queries": SMOKE_QUERIES["photos"]}})
        drills = inv.setdefault("drills", {"repository": {"read_data_period": 1}})
        drills.setdefault("servers", []).append({
            "name": PG_CONTAINER_DRILL_SERVER, "host": "labhost", "port": box.port,
            "user": "postgres", "container": container})

    def _demo_guests(self) -> dict[str, Any]:
        """Guests for the simulator (provisioned by the demo), a bootstrap role, and a
        vzdump job with an off-site copy. The lab's sshd stands in for the LXC guests'
        SSH; bootstrap only writes under the lab's directory."""
        template = "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
        ssh = {"address": self.sshd.host, "port": self.sshd.port}

        def lxc(name: str, vmid: int, node: str, **extra: Any) -> dict[str, Any]:
            return {"name": name, "vmid": vmid, "type": "lxc", "node": node,
                    "template": template, "tags": ["labkeeper", "demo"],
                    "description": f"demo guest {name}",
                    "resources": {"cores": 1, "memory_mb": 512, "swap_mb": 256,
                                  "disk_gb": 4, "storage": "local-lvm"},
                    "network": [{"name": "eth0", "bridge": "vmbr0", "ip": "dhcp"}],
                    "ssh": ssh, **extra}

        files = self.workdir / "guest-files"
        for name in DEMO_APPS:
            self.app_ports.setdefault(name, free_port())
        out: dict[str, Any] = {
            "guests": [
                lxc("proxy", 100, "pve1", drill={"rto_minutes": 30, "rpo_hours": 192}),
                lxc("app", 101, "pve2", roles=["demo-base"]),
                *(lxc(f"web-{name}", vmid, "pve1", tags=["labkeeper", "apps"])
                  for name, vmid in DEMO_APPS.items()),
                {"name": "vm1", "vmid": 110, "type": "qemu", "node": "pve1",
                 "template": "9000", "tags": ["labkeeper", "demo"],
                 "resources": {"cores": 2, "memory_mb": 1024, "disk_gb": 8,
                               "storage": "local-lvm"},
                 "cloud_init": {"user": "admin"}},
            ],
            "roles": {"demo-base": {
                "packages": ["coreutils"],
                "files": [{"path": str(files / "app" / "motd"),
                           "content": "managed by labkeeper for {{ guest.name }}\n",
                           "mode": "0644"}],
            }},
        }
        out["apps"] = [self._demo_app(name) for name in DEMO_APPS]
        if self.images is not None:
            out["guests"].append(lxc(COMPOSE_GUEST[0], COMPOSE_GUEST[1], "pve2",
                                     tags=["labkeeper", "apps"]))
            out["apps"] += [self._compose_app(name) for name in COMPOSE_APPS]
        if self.repo is not None:
            out["path_backups"] = [{"name": "demo-files", "host": "labhost",
                                    "paths": [str(self.workdir / "files")],
                                    "repository": "lab-repo", "progress_interval": 5}]
            out["vzdump_jobs"] = [{
                "name": "demo", "selection": {"tags": ["demo"]}, "storage": "local",
                "retention": {"keep_last": 2}, "schedule": "30 1 * * 6",
                "offsite": {"repository": "lab-repo", "prefix": "vzdump/", "keep_last": 2},
            }]
        return out

    def _demo_app(self, name: str) -> dict[str, Any]:
        """An app whose update is a command over SSH: ``good`` writes version 2.0;
        ``bad`` also breaks its health page, so the health gate fails and the
        update is rolled back from the pre-update snapshot."""
        www = self.app_root(name) / "www"
        update = f"printf %s 2.0 > {www}/VERSION"
        if name == "bad":
            update += f" && printf %s fail > {www}/health"
        return {
            "name": name, "guest": f"web-{name}", "strategy": "commands",
            "commands": {"update": [["sh", "-c", update]],
                         "version": ["cat", str(www / "VERSION")]},
            "health": [{"name": "health page",
                        "http": {"url": f"http://127.0.0.1:{self.app_ports[name]}/health",
                                 "body_contains": "ok"}, "timeout": 2}],
            "gate": {"initial_delay": 0, "interval": 0.2, "deadline": 2, "successes": 2},
        }

    def _compose_app(self, name: str) -> dict[str, Any]:
        """A Compose app on the lab's engine (the guest's SSH is the lab's sshd):
        ``compose-good`` pulls a good version 2; ``compose-bad`` pulls a version 2 whose
        health page is gone and whose container turns unhealthy: the gate fails and the
        previous image comes back (``compose-images``)."""
        port = self.app_ports.setdefault(name, free_port())
        return {
            "name": name, "guest": COMPOSE_GUEST[0], "strategy": "compose",
            "compose": {"dir": str(self.stack_dir(name)), "project": name,
                        "docker_host": self.docker.host},
            "rollback": "compose-images",
            "health": [{"name": "health page",
                        "http": {"url": f"http://127.0.0.1:{port}/health",
                                 "body_contains": "ok"}, "timeout": 2},
                       {"name": "containers", "container": {}, "timeout": 10}],
            "gate": {"initial_delay": 0, "interval": 0.5,
                     "deadline": 8 if name == "compose-bad" else 20, "successes": 2},
        }

    def stack_dir(self, name: str) -> Path:
        return self.workdir / "stacks" / name

    def prepare_compose_apps(self) -> None:
        """Lay out each Compose app's stack, run it on version 1 (``up -d --wait``),
        then make the registry offer its next version (the update pulls it)."""
        from labkeeper import process
        from labkeeper.locallab.images import app_compose_yaml

        assert self.images is not None and self.docker is not None
        for name, offered in COMPOSE_APPS.items():
            stack = self.stack_dir(name)
            stack.mkdir(parents=True, exist_ok=True)
            (stack / "compose.yaml").write_text(app_compose_yaml(
                image=self.images.ref(name), port=self.app_ports[name]))
            self.images.point(name, "1")
            process.run(self.docker.argv("compose", "--project-directory", str(stack),
                                         "-p", name, "up", "-d", "--wait"), timeout=300)
            self.images.point(name, offered)

    def app_root(self, name: str) -> Path:
        return self.workdir / "rootfs" / f"web-{name}"

    def prepare_apps(self) -> None:
        """After provisioning: give each app guest a real root filesystem in the
        simulator (snapshots copy it, rollbacks restore it) and serve its web page."""
        assert self.pvesim is not None
        for name, vmid in DEMO_APPS.items():
            www = self.app_root(name) / "www"
            www.mkdir(parents=True, exist_ok=True)
            (www / "VERSION").write_text("1.0")
            (www / "health").write_text("ok")
            self.pvesim.set_rootfs_dir(vmid, self.app_root(name))
            svc = Service(f"web-{name}",
                          (sys.executable, "-m", "http.server", str(self.app_ports[name]),
                           "--bind", "127.0.0.1", "--directory", str(www)),
                          log_path=self.workdir / f"web-{name}.log")
            svc.start()
            self.app_services.append(svc)
            wait_for_port("127.0.0.1", self.app_ports[name], timeout=15)

    def write_inventory(self) -> Path:
        text = "# Written by labkeeper's local lab; secrets live in ./secrets (0600).\n"
        text += yaml.safe_dump(self.inventory(), sort_keys=False)
        self.inventory_path.write_text(text)
        return self.inventory_path
