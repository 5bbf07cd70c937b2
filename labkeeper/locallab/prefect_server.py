"""A local Prefect server for the demo and the e2e tests, stopped by PID.

SQLite in its PREFECT_HOME by default; ``server_env`` takes the rest of a production
set-up (``PREFECT_SERVER_DATABASE_CONNECTION_URL`` for PostgreSQL,
``PREFECT_SERVER_API_AUTH_STRING``, service intervals): environment only, never argv.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from labkeeper.locallab.ports import free_port
from labkeeper.locallab.services import Service, stop_pid


def prefect_env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


class LocalPrefectServer:
    def __init__(self, home: Path, *, port: int | None = None, host: str = "127.0.0.1",
                 server_env: Mapping[str, str] | None = None) -> None:
        self.home = home
        self.server_env = dict(server_env or {})
        self.host = host
        self.port = port or 0
        self.service: Service | None = None
        self.pidfile = home / "server.pid.json"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    def start(self, *, timeout: float = 90) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port(self.host)
        prefect = str(Path(sys.executable).parent / "prefect")
        env = prefect_env(self.home)
        env.update({"PREFECT_SERVER_API_HOST": self.host,
                    "PREFECT_SERVER_API_PORT": str(self.port),
                    "PREFECT_API_URL": self.api_url,
                    "PREFECT_UI_API_URL": self.api_url, **self.server_env})
        self.service = Service("prefect-server", (prefect, "server", "start"),
                               log_path=self.home / "server.log", env=env)
        self.service.start()
        self._wait_healthy(timeout)
        self.pidfile.write_text(json.dumps({"pid": self.service.pid, "url": self.url}))

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.service is not None
            self.service.check_alive()
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:  # noqa: S310
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"Prefect server at {self.url} not healthy after {timeout:g}s")

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(grace=10)
            self.service = None
        if self.pidfile.exists():
            self.pidfile.unlink()


def stop_recorded_server(home: Path) -> bool:
    """Stop a server started earlier (by another process) from its pid file."""
    pidfile = home / "server.pid.json"
    if not pidfile.exists():
        return False
    pid = int(json.loads(pidfile.read_text())["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        pidfile.unlink()
        return False
    stop_pid(pid, grace=10)
    pidfile.unlink()
    return True
