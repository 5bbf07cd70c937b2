"""A private Docker engine and a loopback registry for the local lab (tests, demo).

:class:`LocalDocker` starts Debian's ``dockerd`` (package ``docker.io``) as a child
process in its own session, on a private socket with private ``--data-root``,
``--exec-root`` and ``--pidfile`` and no networking of its own (``--bridge=none
--iptables=false --ip-masq=false``): containers use host networking only, so every
address stays on loopback. The runtime state (socket, exec-root, pidfile) lives in a
short directory under ``/tmp`` because unix socket paths are limited to 108 bytes;
the images and containers live in ``workdir/data``. :meth:`LocalDocker.stop` removes
every container, stops the daemon by its PID, then makes sure no containerd, shim
or container process and no mount under its directories is left
(:meth:`LocalDocker.leftovers`).

The client is whichever ``docker`` comes first in PATH (this machine may carry a
newer CLI in /usr/local/bin than Debian's /usr/bin/docker); ``LABKEEPER_DOCKER``
names another one. :attr:`LocalDocker.client` says which was used.

:class:`LocalRegistry` runs Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1:PORT with its configuration and storage in its workdir. Docker talks
plain HTTP to loopback registries without configuration.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from labkeeper import process
from labkeeper.errors import ServiceError
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import Service, is_zombie, log_tail, stop_pid
from labkeeper.process import CommandResult

DOCKERD = Path("/usr/sbin/dockerd")
REGISTRY = Path("/usr/bin/docker-registry")
START_TIMEOUT = 60.0
SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; keep a margin


class EngineError(ServiceError):
    """The local Docker engine (or registry) could not start or stop cleanly."""

    def __init__(self, message: str, *, service: str = "dockerd") -> None:
        super().__init__(message, service=service)


def docker_client() -> str:
    """The ``docker`` CLI the lab uses: ``$LABKEEPER_DOCKER``, else the first in PATH."""
    named = os.environ.get("LABKEEPER_DOCKER")
    found = named or shutil.which("docker")
    if not found or not os.access(found, os.X_OK):
        raise EngineError(f"no docker client: {named or 'docker'} not found "
                          "(install docker.io: `make setup`)", service="docker")
    return found


def dockerd_argv(*, data_root: Path, run_dir: Path, sock: Path,
                 extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The daemon's argv (pure): private roots and socket, no bridge, no iptables."""
    return (str(DOCKERD),
            "--config-file", str(run_dir / "daemon.json"),
            "--data-root", str(data_root),
            "--exec-root", str(run_dir / "exec"),
            "--pidfile", str(run_dir / "dockerd.pid"),
            "-H", f"unix://{sock}",
            "--bridge=none", "--iptables=false", "--ip-masq=false",
            "--shutdown-timeout", "2", *extra)


def daemon_json(run_dir: Path) -> str:
    """The daemon's configuration file (pure): nothing from /etc/docker/daemon.json, and
    its identity key in ``run_dir`` instead of /etc/docker/key.json."""
    return json.dumps({"deprecated-key-path": str(run_dir / "key.json")}) + "\n"


def registry_config(*, storage: Path, port: int, host: str = "127.0.0.1") -> str:
    """The registry's configuration file (pure; JSON is valid YAML)."""
    return json.dumps({
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(storage)},
                    "delete": {"enabled": True}},
        "http": {"addr": f"{host}:{port}"},
    }, indent=2) + "\n"


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line with spaces) of every process now running."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[-1].split()[1])
        table[int(entry.name)] = (ppid, cmd.replace(b"\0", b" ").decode(errors="replace"))
    return table


def _mounts_under(roots: Sequence[Path]) -> list[str]:
    """Mount points under any of ``roots``, deepest first."""
    found = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


class LocalDocker:
    """A private ``dockerd``; use as a context manager or call start()/stop()."""

    def __init__(self, workdir: Path, *, start_timeout: float = START_TIMEOUT,
                 extra_args: Sequence[str] = ()) -> None:
        """``extra_args`` go to dockerd (e.g. ``--storage-driver=vfs`` where overlay
        cannot work)."""
        self.extra_args = tuple(extra_args)
        self.workdir = Path(workdir).absolute()
        self.data_root = self.workdir / "data"
        self.log_path = self.workdir / "dockerd.log"
        self.start_timeout = start_timeout
        self.client = docker_client()
        run_dir = self.workdir / "run"
        self._own_run_dir = len(str(run_dir / "exec/containerd/containerd.sock.ttrpc")) \
            > SOCKET_PATH_MAX
        if self._own_run_dir:
            run_dir = Path(tempfile.mkdtemp(prefix="lkd-", dir="/tmp"))
        self.run_dir = run_dir
        self.sock = run_dir / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.env = {"DOCKER_HOST": self.host}
        self.start_seconds = 0.0
        self._service: Service | None = None
        self._pid: int | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> LocalDocker:
        if not DOCKERD.exists():
            raise EngineError(f"{DOCKERD} not found: install Debian's docker.io (`make setup`)")
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.run_dir / "daemon.json").write_text(daemon_json(self.run_dir))
        began = time.monotonic()
        self._service = Service("dockerd", dockerd_argv(
            data_root=self.data_root, run_dir=self.run_dir, sock=self.sock,
            extra=self.extra_args),
            log_path=self.log_path)
        self._service.start()
        self._pid = self._service.pid
        try:
            self._wait_ready()
        except EngineError:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _wait_ready(self) -> None:
        assert self._service is not None
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            proc = self._service.proc
            if proc is not None and proc.poll() is not None:
                raise EngineError(
                    f"dockerd exited with {proc.returncode} while starting; its log ends:\n"
                    + log_tail(self.log_path, 15))
            if self.sock.exists():
                res = self.docker("info", "--format", "{{.ServerVersion}}", timeout=15,
                                  check=False)
                if res.ok:
                    return
                last = res.stderr_tail(3)
            time.sleep(0.1)
        raise EngineError(f"dockerd did not answer on {self.host} within "
                          f"{self.start_timeout:g}s ({last}); its log ends:\n"
                          + log_tail(self.log_path, 15))

    @property
    def pid(self) -> int | None:
        """The daemon's PID (None before start / after stop)."""
        return self._pid if self.running() else None

    def running(self) -> bool:
        return self._service is not None and self._service.proc is not None \
            and self._service.proc.poll() is None

    def stop(self) -> None:
        """Remove every container, stop the daemon by PID, kill what it left, unmount."""
        if self.running():
            ids = self.docker("ps", "-aq", timeout=30, check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", "-v", *ids, timeout=120, check=False)
        left = self.pids()
        if self._service is not None:
            self._service.stop(grace=30.0)
            self._service = None
        for pid in left:
            stop_pid(pid, grace=2.0, group=False, first_signal=signal.SIGKILL)
        for pid in self.pids():  # started while we stopped (should be none)
            stop_pid(pid, grace=2.0, group=False, first_signal=signal.SIGKILL)
        for point in _mounts_under([self.data_root, self.run_dir]):
            if process.run(("umount", point), timeout=30, check=False).returncode != 0:
                process.run(("umount", "-l", point), timeout=30, check=False)
        if self._own_run_dir and not self.leftovers():
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> LocalDocker:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- what runs ----------------------------------------------------------------------
    def pids(self) -> list[int]:
        """The daemon, its containerd, the shims and every container process (alive)."""
        table = _proc_table()
        marks = (str(self.run_dir), str(self.data_root))
        roots = {pid for pid, (_, cmd) in table.items() if any(m in cmd for m in marks)}
        if self._pid is not None and self._pid in table:
            roots.add(self._pid)
        found = set(roots)
        changed = True
        while changed:
            children = {pid for pid, (ppid, _) in table.items()
                        if ppid in found and pid not in found}
            found |= children
            changed = bool(children)
        return sorted(pid for pid in found if not is_zombie(pid) and pid != os.getpid())

    def leftovers(self) -> list[str]:
        """What is still there after stop(): processes and mounts (empty when clean)."""
        table = _proc_table()
        out = [f"pid {pid}: {table.get(pid, (0, '?'))[1][:160]}" for pid in self.pids()]
        out += [f"mount {m}" for m in _mounts_under([self.data_root, self.run_dir])]
        return out

    # -- running the client -------------------------------------------------------------
    def argv(self, *args: str) -> tuple[str, ...]:
        """``docker --host HOST ARGS...`` (pure)."""
        return (self.client, "--host", self.host, *args)

    def docker(self, *args: str, timeout: float = 120.0, check: bool = True,
               input: bytes | None = None, env: dict[str, str] | None = None) -> CommandResult:
        """Run the docker client against this engine."""
        return process.run(self.argv(*args), timeout=timeout, check=check, input=input,
                           env={"DOCKER_BUILDKIT": "0", **(env or {})})

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)


class LocalRegistry:
    """Debian's ``docker-registry`` on 127.0.0.1:PORT, stopped by PID."""

    def __init__(self, workdir: Path, port: int | None = None, *,
                 start_timeout: float = 30.0) -> None:
        self.workdir = Path(workdir).absolute()
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.config_path = self.workdir / "registry.json"
        self.storage = self.workdir / "storage"
        self.log_path = self.workdir / "registry.log"
        self.start_timeout = start_timeout
        self._service: Service | None = None

    @property
    def pid(self) -> int | None:
        return self._service.pid if self._service else None

    def start(self) -> LocalRegistry:
        if not REGISTRY.exists():
            raise EngineError(f"{REGISTRY} not found: install Debian's docker-registry "
                              "(`make setup`)", service="docker-registry")
        self.storage.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(registry_config(storage=self.storage, port=self.port))
        self._service = Service("docker-registry", (str(REGISTRY), "serve",
                                                    str(self.config_path)),
                                log_path=self.log_path)
        self._service.start()
        try:
            wait_for_port("127.0.0.1", self.port, timeout=self.start_timeout)
            self._service.check_alive()
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=10) as r:
                if r.status != 200:
                    raise EngineError(f"registry answered {r.status} on /v2/",
                                      service="docker-registry")
        except (OSError, TimeoutError, RuntimeError) as exc:
            self.stop()
            raise EngineError(f"docker-registry did not start on {self.address} ({exc}); "
                              f"log:\n{log_tail(self.log_path)}",
                              service="docker-registry") from None
        return self

    def stop(self) -> None:
        if self._service is not None:
            self._service.stop(grace=10.0)
            self._service = None

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def tags(self, repo: str) -> list[str]:
        """The tags the registry offers for ``repo`` (empty when it has none)."""
        try:
            with urllib.request.urlopen(
                    f"http://{self.address}/v2/{repo}/tags/list", timeout=10) as r:
                return sorted(json.loads(r.read()).get("tags") or [])
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return []
            raise
