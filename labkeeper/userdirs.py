"""Default places for labkeeper's state and SSH host keys: the system's for root (or a
service user that owns them), per-user XDG places for anyone else.

- ``state_dir``: ``/var/lib/labkeeper`` for root, or when it exists and is writable;
  else ``$XDG_STATE_HOME/labkeeper`` (``~/.local/state/labkeeper``).
- ``known_hosts``: ``/etc/labkeeper/known_hosts`` for root, or when it exists and is
  readable; else ``$XDG_CONFIG_HOME/labkeeper/known_hosts``
  (``~/.config/labkeeper/known_hosts``).

Without a home directory a non-root user gets the system place (the error that follows
names the path; set ``settings.state_dir`` / ``settings.known_hosts``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

SYSTEM_STATE_DIR = Path("/var/lib/labkeeper")
SYSTEM_KNOWN_HOSTS = Path("/etc/labkeeper/known_hosts")


def choose(system: Path, *, xdg_var: str, xdg_fallback: str, tail: str, euid: int,
           environ: Mapping[str, str], usable: Callable[[Path], bool]) -> Path:
    """The system path for root or when ``usable``; else ``$<xdg_var>/<tail>``, with
    ``~/<xdg_fallback>`` when the variable is unset or not absolute (pure)."""
    if euid == 0 or usable(system):
        return system
    base = environ.get(xdg_var, "")
    if not os.path.isabs(base):
        home = environ.get("HOME", "")
        if not os.path.isabs(home):
            return system
        base = os.path.join(home, xdg_fallback)
    return Path(base) / tail


def _writable_dir(path: Path) -> bool:
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _readable_file(path: Path) -> bool:
    return path.is_file() and os.access(path, os.R_OK)


def default_state_dir() -> Path:
    return choose(SYSTEM_STATE_DIR, xdg_var="XDG_STATE_HOME", xdg_fallback=".local/state",
                  tail="labkeeper", euid=os.geteuid(), environ=os.environ,
                  usable=_writable_dir)


def default_known_hosts() -> Path:
    return choose(SYSTEM_KNOWN_HOSTS, xdg_var="XDG_CONFIG_HOME", xdg_fallback=".config",
                  tail="labkeeper/known_hosts", euid=os.geteuid(), environ=os.environ,
                  usable=_readable_file)
