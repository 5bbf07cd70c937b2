"""Which restic repository, opened how: :class:`Repo` (its location, its resolved
secrets, the restic binary) and its resolution from the inventory
(:func:`repo_for`, :func:`open_repo` with restic's persistent cache).

Secrets reach restic only through its environment (:meth:`Repo.env`), never argv.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import SecretStr

from labkeeper.errors import ConfigError
from labkeeper.secrets import resolve

if TYPE_CHECKING:
    from labkeeper.inventory import Inventory

RESTIC = "restic"
BINARY_ENV = "LABKEEPER_RESTIC"
"""Environment variable naming the restic binary labkeeper runs (default: ``restic``)."""


def default_binary() -> str:
    """The restic labkeeper runs: ``$LABKEEPER_RESTIC``, else ``restic`` on PATH."""
    return os.environ.get(BINARY_ENV) or RESTIC


@dataclass(frozen=True)
class Repo:
    """Where a repository is and the secrets to open it (resolved values)."""

    url: str
    password: SecretStr
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    ca_file: str | None = None
    cache_dir: str | None = None
    binary: str | None = None
    """The restic to run; None: :func:`default_binary`."""

    @property
    def program(self) -> str:
        """The restic binary this repository's commands run."""
        return self.binary or default_binary()

    def env(self) -> dict[str, str]:
        env = {"RESTIC_REPOSITORY": self.url,
               "RESTIC_PASSWORD": self.password.get_secret_value(),
               "RESTIC_PROGRESS_FPS": "0.2"}
        if self.aws_access_key_id is not None:
            env["AWS_ACCESS_KEY_ID"] = self.aws_access_key_id.get_secret_value()
        if self.aws_secret_access_key is not None:
            env["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_access_key.get_secret_value()
        if self.cache_dir:
            env["RESTIC_CACHE_DIR"] = self.cache_dir
        return env

    def base_argv(self, binary: str | None = None) -> tuple[str, ...]:
        """The restic program (``binary``, e.g. a backup host's, else :attr:`program`)
        and the options every command of this repository takes. A ``ca_file`` must
        exist at the same path wherever restic runs."""
        argv: tuple[str, ...] = (binary or self.program,)
        if self.ca_file:
            argv += ("--cacert", self.ca_file)
        return argv


def repo_for(inv: Inventory, name: str, *, cache_dir: str | None = None) -> Repo:
    """The restic repository of the inventory with its secrets resolved."""
    r = inv.repository(name)
    s3 = r.s3
    return Repo(
        url=r.url,
        password=resolve(r.password),
        aws_access_key_id=resolve(s3.access_key_id) if s3 else None,
        aws_secret_access_key=resolve(s3.secret_access_key) if s3 else None,
        ca_file=str(s3.ca_file) if s3 and s3.ca_file else None,
        cache_dir=cache_dir,
        binary=inv.settings.restic_binary,
    )


def repo_cache_dir(inv: Inventory, repo_name: str,
                   environ: Mapping[str, str] | None = None) -> Path:
    """restic's persistent cache for one repository (B2 bills list/download calls): the
    inventory's ``cache_dir`` (the repository's, else ``settings.cache_dir/<name>``),
    else ``$RESTIC_CACHE_DIR`` when set (never silently overridden), else
    ``settings.state_dir/cache/<name>``."""
    r = inv.repository(repo_name)
    if r.cache_dir is not None:
        return r.cache_dir
    if inv.settings.cache_dir is not None:
        return inv.settings.cache_dir / repo_name
    from_env = (os.environ if environ is None else environ).get("RESTIC_CACHE_DIR", "")
    if os.path.isabs(from_env):
        return Path(from_env)
    return inv.settings.effective_cache_dir / repo_name


def open_repo(inv: Inventory, repo_name: str) -> Repo:
    """:func:`repo_for` with its cache directory created (the backups' way in)."""
    cache = repo_cache_dir(inv, repo_name)
    try:
        cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:  # say what to set, not only what failed
        raise ConfigError(
            f"cannot create restic's cache directory {cache} ({exc.strerror}): set "
            "settings.cache_dir or settings.state_dir in the inventory (or "
            "$RESTIC_CACHE_DIR) to a directory this user can write") from None
    return repo_for(inv, repo_name, cache_dir=str(cache))
