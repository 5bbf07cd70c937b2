"""The Prefect server a command-line run records to when no server is configured.

A flow needs a Prefect API. Without ``PREFECT_API_URL`` Prefect would start a
*temporary* server inside every command (seconds a run, and two commands at once
share one SQLite file: ``database is locked``). Instead the command line:

1. uses ``PREFECT_API_URL`` when it is set (environment or the active Prefect profile);
2. else uses the local server on ``127.0.0.1:<port>`` (``$LABKEEPER_PREFECT_PORT``,
   default 4200, Prefect's own default: the server ``make demo`` / ``labkeeper server
   start`` / ``prefect server start`` keep) if it answers ``/api/health``;
3. else starts one there, once: ``prefect server start`` detached, with its own
   ``PREFECT_HOME`` (``$LABKEEPER_PREFECT_HOME``, default
   ``$XDG_STATE_HOME/labkeeper/prefect``: SQLite, log, pid file), and leaves it running
   for the next commands (``labkeeper server stop`` stops it). Commands starting at the
   same moment take a file lock around steps 2-3: one starts the server, the others
   wait for it and use it.

Nothing here imports Prefect; what probing and the start cost is measured in
``benchmarks/README.md`` (``run_cost_bench.py``). The start is logged
(``labkeeper.local_server``): the command line prints labkeeper's records on stderr.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from labkeeper import process
from labkeeper.errors import ServiceError

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
START_TIMEOUT = 180.0


@dataclass(frozen=True)
class LocalServer:
    home: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def pidfile(self) -> Path:
        return self.home / "server.pid.json"

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"


def local_server(environ: Mapping[str, str] = os.environ) -> LocalServer:
    """Where the local server lives (pure: from the environment)."""
    home = environ.get("LABKEEPER_PREFECT_HOME")
    if not home:
        state = environ.get("XDG_STATE_HOME") or str(Path(environ.get("HOME", "/root"))
                                                      / ".local" / "state")
        home = str(Path(state) / "labkeeper" / "prefect")
    return LocalServer(home=Path(home), port=int(environ.get("LABKEEPER_PREFECT_PORT",
                                                             DEFAULT_PORT)))


def configured_api_url(environ: Mapping[str, str] = os.environ) -> str | None:
    """``PREFECT_API_URL`` from the environment, else from the active Prefect profile
    (``$PREFECT_PROFILES_PATH``, default ``$PREFECT_HOME/profiles.toml``)."""
    if environ.get("PREFECT_API_URL"):
        return environ["PREFECT_API_URL"]
    prefect_home = Path(environ.get("PREFECT_HOME") or Path(environ.get("HOME", "/root"))
                        / ".prefect")
    path = Path(environ.get("PREFECT_PROFILES_PATH") or prefect_home / "profiles.toml")
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    active = environ.get("PREFECT_PROFILE") or data.get("active") or "local"
    url = data.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:  # noqa: S310
            return bool(r.status == 200)
    except OSError:
        return False


def server_argv() -> tuple[str, ...]:
    return (str(Path(sys.executable).parent / "prefect"), "server", "start")


def server_env(srv: LocalServer, base: Mapping[str, str]) -> dict[str, str]:
    """The child allowlist (labkeeper.process) plus the operator's ``PREFECT_SERVER_*``
    settings (database URL, auth string, services); never the client's API settings."""
    env = process.inherited_env(base)
    env.update({k: v for k, v in base.items() if k.startswith("PREFECT_SERVER_")})
    env.update({"PREFECT_HOME": str(srv.home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_API_HOST": HOST, "PREFECT_SERVER_API_PORT": str(srv.port),
                "PREFECT_API_URL": srv.api_url, "PREFECT_UI_API_URL": srv.api_url})
    return env


@contextlib.contextmanager
def _start_lock(srv: LocalServer) -> Iterator[None]:
    srv.home.mkdir(parents=True, exist_ok=True)
    with open(srv.home / "server.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


def start(srv: LocalServer, *, timeout: float = START_TIMEOUT,
          environ: Mapping[str, str] = os.environ) -> int:
    """Start the server detached (its own session: it outlives this command); wait until
    healthy; record its pid. Raises ServiceError when it dies or stays unhealthy."""
    srv.home.mkdir(parents=True, exist_ok=True)
    process.check_argv(server_argv())
    # A daemon, not a command that runs to completion: Popen here like the lab's
    # services (labkeeper.process runs commands to their end, bounded by a timeout).
    with open(srv.log_path, "ab") as log:
        proc = subprocess.Popen(server_argv(), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=server_env(srv, environ),
                                start_new_session=True, close_fds=True, cwd=srv.home)
    srv.pidfile.write_text(json.dumps({"pid": proc.pid, "url": srv.url}))  # stoppable now
    deadline = time.monotonic() + timeout
    while not healthy(srv.api_url, timeout=1.0):
        if proc.poll() is not None:
            raise ServiceError(f"the local Prefect server exited with {proc.returncode} "
                               f"(port {srv.port} in use? log: {srv.log_path}); set "
                               "PREFECT_API_URL or LABKEEPER_PREFECT_PORT", service="prefect")
        if time.monotonic() > deadline:
            raise ServiceError(f"the local Prefect server on {srv.url} is not healthy after "
                               f"{timeout:g} s (log: {srv.log_path})", service="prefect",
                               transient=True)
        time.sleep(0.2)
    proc.returncode = 0  # it outlives us by design: no "still running" warning
    start_runner(srv, environ)
    return proc.pid


def ensure(srv: LocalServer, *, timeout: float = START_TIMEOUT,
           environ: Mapping[str, str] = os.environ) -> str:
    """Use the local server if it answers, else start it (once, under a file lock).
    Returns ``"running"`` or ``"started"``."""
    if healthy(srv.api_url):
        start_runner(srv, environ)  # unless one serves: a no-op after a flock probe
        return "running"
    with _start_lock(srv):
        if healthy(srv.api_url):  # another command started it while we waited
            return "running"
        logger.info("labkeeper: no Prefect server configured or running: starting a local "
                    "one on %s (kept for later commands; history in %s; `labkeeper server "
                    "stop` stops it)", srv.url, srv.home)
        start(srv, timeout=timeout, environ=environ)
        return "started"


def use_for_command(environ: MutableMapping[str, str], *, start_if_needed: bool = True
                    ) -> str:
    """Point this process's Prefect client at a server (see the module docstring).
    Returns what it did: ``configured`` | ``running`` | ``started`` | ``none``."""
    if configured_api_url(environ):
        return "configured"
    srv = local_server(environ)
    if start_if_needed:
        how = ensure(srv, environ=environ)
    elif healthy(srv.api_url):
        how = "running"
    else:
        return "none"
    environ["PREFECT_API_URL"] = srv.api_url
    environ.setdefault("PREFECT_HOME", str(srv.home))
    return how


def stop(srv: LocalServer, *, grace: float = 10.0) -> bool:
    """Stop the server this machine's commands started (by the pid in its pid file)."""
    try:
        pid = int(json.loads(srv.pidfile.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return False
    srv.pidfile.unlink()
    stop_runner(srv)
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # gone already
    if b"prefect" not in cmdline or b"server" not in cmdline:
        return False  # the pid was reused by something else: leave it alone
    try:
        os.killpg(pid, 15)
    except ProcessLookupError:
        return False
    _end(pid, grace=grace, kill=os.killpg, every=0.1)
    return True


def _end(pid: int, *, grace: float, kill: Callable[[int, int], None], every: float) -> None:
    """Wait up to ``grace`` s for ``pid`` (sent SIGTERM) to be gone, then SIGKILL it."""
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # our own child: reap it
            os.waitpid(pid, os.WNOHANG)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(every)
    with contextlib.suppress(ProcessLookupError):
        kill(pid, 9)


# -- the warm runner beside the server (cli/runner.py) ---------------------------------
# Flow commands fork from it instead of importing Prefect and the flows each time. It is
# started here as a command (the core imports nothing of cli/), with the allowlisted
# environment only: every command brings its own environment, secrets included.
def runner_socket(srv: LocalServer) -> Path:
    return srv.home / "runner.sock"  # cli/runner_client.socket_path says the same


def runner_pidfile(srv: LocalServer) -> Path:
    return srv.home / "runner.pid.json"


def runner_alive(srv: LocalServer) -> bool:
    """A runner serves this home: it holds ``runner.lock`` (no connection needed)."""
    try:
        fd = os.open(runner_socket(srv).with_suffix(".lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def runner_argv(srv: LocalServer) -> tuple[str, ...]:
    return (sys.executable, "-m", "cli.main", "runner", "--socket", str(runner_socket(srv)))


# Prefect settings a runner may be started with: none of them secret (an API key, an
# auth string, a database URL with its password stay with the commands that have them).
_PLAIN_PREFECT = frozenset({"PREFECT_API_URL", "PREFECT_HOME", "PREFECT_PROFILE",
                            "PREFECT_PROFILES_PATH", "PREFECT_SERVER_ANALYTICS_ENABLED"})


def runner_prefect_env(srv: LocalServer, environ: Mapping[str, str]) -> dict[str, str]:
    """The Prefect settings of the commands that will use this runner, as far as they
    are not secret: ``environ``'s, with this local server's address and home where no
    server is configured (what :func:`use_for_command` gives a command). A runner built
    with the same settings as a command's spares the command rebuilding them."""
    env = {k: v for k, v in environ.items()
           if k in _PLAIN_PREFECT or k.startswith("PREFECT_LOGGING_")}
    if "@" in urllib.parse.urlsplit(env.get("PREFECT_API_URL", "")).netloc:
        del env["PREFECT_API_URL"]  # credentials in the address: not for the runner
    if not configured_api_url(environ):
        env["PREFECT_API_URL"] = srv.api_url
        env.setdefault("PREFECT_HOME", str(srv.home))
    return env


def start_runner(srv: LocalServer, environ: Mapping[str, str] = os.environ) -> int | None:
    """Start the runner detached unless one serves already (or ``LABKEEPER_NO_RUNNER``
    is set); its pid, or None. It does not wait: the runner is ready in ~2-3 s, and a
    command arriving before runs in its own process."""
    if environ.get("LABKEEPER_NO_RUNNER", "").strip() not in ("", "0") or runner_alive(srv):
        return None
    srv.home.mkdir(parents=True, exist_ok=True)
    env = process.inherited_env(environ)
    env.update({k: environ[k] for k in ("LABKEEPER_RUNNER_STAMP", "LABKEEPER_LOG_LEVEL")
                if k in environ})
    env.update(runner_prefect_env(srv, environ))
    root = Path(__file__).resolve().parents[1]
    if (root / "cli").is_dir():  # a source checkout: the runner imports the same code
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH"))
                                            if p)
    process.check_argv(runner_argv(srv))
    with open(srv.home / "runner.log", "ab") as log:
        proc = subprocess.Popen(runner_argv(srv), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                close_fds=True, cwd=srv.home)
    runner_pidfile(srv).write_text(json.dumps({"pid": proc.pid}))
    proc.returncode = 0  # it outlives us by design
    return proc.pid


def stop_runner(srv: LocalServer, *, grace: float = 10.0) -> bool:
    """Stop the runner by the pid in its pid file: SIGTERM (it stops listening and ends
    when its running commands have), SIGKILL after ``grace`` (the commands keep running:
    each is its own process group and reports its own exit status)."""
    try:
        pid = int(json.loads(runner_pidfile(srv).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return False
    runner_pidfile(srv).unlink()
    try:
        if b"runner" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False  # the pid was reused by something else: leave it alone
        os.kill(pid, 15)
    except (OSError, ProcessLookupError):
        return False
    _end(pid, grace=grace, kill=os.kill, every=0.05)
    return True
