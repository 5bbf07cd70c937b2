"""A new user's first hour, for real: the installed command switches Prefect's
analytics off, a non-root user gets per-user default places, and a database that is
down fails with the address the inventory gave."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from labkeeper import postgres
from labkeeper.errors import CommandError

PY = sys.executable

ENTRY_ANALYTICS = (
    "from importlib.metadata import entry_points\n"
    "entry_points(group='console_scripts')['labkeeper'].load()\n"
    "from prefect.settings import get_current_settings\n"
    "print(get_current_settings().server.analytics_enabled)\n")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "LABKEEPER_"))}
    env.update(extra)
    return env


def test_the_installed_command_switches_prefect_analytics_off_unless_the_user_set_them():
    off = subprocess.run([PY, "-c", ENTRY_ANALYTICS], env=_env(), capture_output=True,
                         text=True, timeout=120, check=True)
    assert off.stdout.strip() == "False", off.stderr
    kept = subprocess.run([PY, "-c", ENTRY_ANALYTICS],
                          env=_env(PREFECT_SERVER_ANALYTICS_ENABLED="true"),
                          capture_output=True, text=True, timeout=120, check=True)
    assert kept.stdout.strip() == "True", kept.stderr


def test_a_non_root_user_gets_per_user_state_and_known_hosts_defaults(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(home, 0o777)
    code = ("from labkeeper.inventory import Settings\n"
            "s = Settings()\nprint(s.state_dir)\nprint(s.known_hosts)\n")
    argv = [PY, "-c", code]
    if os.geteuid() == 0:  # become a user who cannot write /var/lib/labkeeper
        argv = [shutil.which("setpriv") or "setpriv", "--reuid=65534", "--regid=65534",
                "--clear-groups", *argv]
    res = subprocess.run(argv, env={"HOME": str(home), "PATH": os.environ["PATH"]},
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [f"{home}/.local/state/labkeeper",
                                  f"{home}/.config/labkeeper/known_hosts"]


@pytest.fixture
def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_database_that_is_down_fails_naming_the_address_the_inventory_gave(closed_port):
    conn = postgres.Conn(host="127.0.0.1", port=closed_port, dbname="appdb", user="backup")
    with pytest.raises(CommandError) as caught:
        postgres.query(conn, "SELECT 1", timeout=60)
    message = str(caught.value)
    assert f"127.0.0.1:{closed_port}/appdb" in message and "localhost" not in message
    assert caught.value.transient  # a server that is down may come back: retried
