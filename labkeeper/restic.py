"""restic through the process runner: argv builders, exit codes, JSON models.

Secrets reach restic only through its environment (``RESTIC_PASSWORD``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), never argv.

restic 0.14 (Debian 12) exits 1 for most fatal errors; 10/11/12 arrived in
0.17. :func:`classify_failure` reads stderr to tell the same cases apart on
older versions, so both map onto the same typed meaning.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from labkeeper import process
from labkeeper.errors import CommandError
from labkeeper.process import ExitCode, ExitCodeTable

RESTIC = "restic"

# https://restic.readthedocs.io/en/stable/075_scripting.html#exit-codes
EXIT_CODES = ExitCodeTable("restic", {
    0: ExitCode("success", "ok"),
    1: ExitCode("fatal error", "permanent"),
    3: ExitCode("some source data could not be read (snapshot incomplete)", "warning"),
    10: ExitCode("repository does not exist", "permanent"),
    11: ExitCode("failed to lock repository", "transient"),
    12: ExitCode("wrong password", "permanent"),
    130: ExitCode("interrupted", "transient"),
})

# restic < 0.17 exits 1 for these; recognise them by their message.
_STDERR_MEANINGS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (re.compile(r"wrong password or no key found"), "wrong password", False),
    (re.compile(r"unable to open config file|Is there a repository at the following location"),
     "repository does not exist", False),
    (re.compile(r"unable to create lock|repository is already locked"),
     "failed to lock repository", True),
    (re.compile(r"connection refused|connection reset|i/o timeout|TLS handshake timeout|"
                r"no such host|503 Service Unavailable|500 Internal Server Error"),
     "repository backend unreachable", True),
)


def classify_failure(err: CommandError) -> CommandError:
    """Refine a restic CommandError (exit 1 on 0.14) from its stderr."""
    if err.returncode != 1:
        return err
    for pattern, meaning, transient in _STDERR_MEANINGS:
        if pattern.search(err.stderr_tail):
            message = f"restic: {meaning}"
            last = err.stderr_tail.splitlines()[-1] if err.stderr_tail else ""
            if last:
                message += f": {last}"
            return CommandError(message, argv=err.argv, returncode=err.returncode,
                                stderr_tail=err.stderr_tail, meaning=meaning,
                                transient=transient)
    return err


@dataclass(frozen=True)
class Repo:
    """Where a repository is and the secrets to open it (resolved values)."""

    url: str
    password: SecretStr
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None
    ca_file: str | None = None
    cache_dir: str | None = None

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

    def base_argv(self) -> tuple[str, ...]:
        argv: tuple[str, ...] = (RESTIC,)
        if self.ca_file:
            argv += ("--cacert", self.ca_file)
        return argv


# -- argv builders (pure) ------------------------------------------------------------

def init_argv(repo: Repo, *, compression: bool = True) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "init", "--json")
    if compression:
        argv += ("--repository-version", "2")
    return argv


def snapshots_argv(repo: Repo, *, tags: Sequence[str] = (), host: str | None = None,
                   paths: Sequence[str] = ()) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "snapshots", "--json", "--no-lock")
    for t in tags:
        argv += ("--tag", t)
    if host:
        argv += ("--host", host)
    for p in paths:
        argv += ("--path", p)
    return argv


def cat_config_argv(repo: Repo) -> tuple[str, ...]:
    return (*repo.base_argv(), "cat", "config", "--no-lock")


def version_argv() -> tuple[str, ...]:
    return (RESTIC, "version")


# -- parsers (pure) ------------------------------------------------------------------

class Snapshot(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    short_id: str = ""
    time: datetime
    hostname: str = ""
    paths: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    parent: str | None = None
    tree: str | None = None


class RepoConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int
    id: str


def parse_snapshots(stdout: str) -> list[Snapshot]:
    data = json.loads(stdout or "[]")
    if data is None:
        return []
    return [Snapshot.model_validate(s) for s in data]


_VERSION_RE = re.compile(r"^restic (\d+\.\d+\.\d+)")


def parse_version(stdout: str) -> str:
    m = _VERSION_RE.match(stdout.strip())
    if not m:
        raise ValueError(f"unexpected `restic version` output: {stdout[:80]!r}")
    return m.group(1)


# -- runner --------------------------------------------------------------------------

def run_restic(repo: Repo | None, argv: Sequence[str], *, timeout: float,
               extra_env: Mapping[str, str] | None = None,
               **kwargs: object) -> process.CommandResult:
    """Run a restic command with the repository's secrets in its environment."""
    env = {**(repo.env() if repo else {}), **(extra_env or {})}
    try:
        return process.run(tuple(argv), timeout=timeout, codes=EXIT_CODES, env=env,
                           **kwargs)  # type: ignore[arg-type]
    except CommandError as exc:
        raise classify_failure(exc) from None


def version(*, timeout: float = 15) -> str:
    return parse_version(run_restic(None, version_argv(), timeout=timeout).stdout)


def init(repo: Repo, *, timeout: float = 120) -> None:
    run_restic(repo, init_argv(repo), timeout=timeout)


def snapshots(repo: Repo, *, timeout: float = 120, tags: Sequence[str] = ()) -> list[Snapshot]:
    res = run_restic(repo, snapshots_argv(repo, tags=tags), timeout=timeout)
    return parse_snapshots(res.stdout)


def repo_config(repo: Repo, *, timeout: float = 60) -> RepoConfig:
    res = run_restic(repo, cat_config_argv(repo), timeout=timeout)
    return RepoConfig.model_validate_json(res.stdout)
