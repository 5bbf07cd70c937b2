"""restic through the process runner: argv builders, exit codes, JSON models.

Secrets reach restic only through its environment (``RESTIC_PASSWORD``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), never argv.

restic 0.14 (Debian 12) exits 1 for most fatal errors; 10/11/12 arrived in
0.17. :func:`classify_failure` reads stderr to tell the same cases apart on
older versions, so both map onto the same typed meaning; restic >= 0.17 also
prints a fatal error as one JSON ``exit_error`` line when ``--json`` is given,
whose message is used instead of the raw line.

**Versions.** restic 0.14 (Debian 12) through 0.18 (Debian 13). Which binary:
``Repo.binary``, else ``$LABKEEPER_RESTIC``, else ``restic`` on PATH. Its version is
read once per binary (:func:`version_info`, cached by path and modification time).
Differences handled here:

- **Snapshot ids.** 0.14's ``backup --json`` summary names the snapshot by its
  short id, 0.18's by its full id. Every summary this module returns carries the
  **full** 64-hex id (:func:`canonical_summary`: one ``restic snapshots`` look-up
  on versions that print the short one); compare ids with :func:`same_id`, show
  them with :func:`short_id`.
- **Locks.** 0.16+ has ``--retry-lock``: ``forget`` (policy or ids), ``prune`` and
  ``check`` wait for a conflicting lock themselves for a short while
  (:data:`RETRY_LOCK_SECONDS`) after our own :func:`wait_for_locks`. An unloadable
  lock file (one that vanished between restic's listing and its load): 0.14's
  backend retries the load ~10 times over ~45 s and then goes on; 0.18 does not
  retry a missing file, its lock check re-runs after 5, 15 and 35 s and then fails
  (exit 1, "unable to create lock in backend": a lock failure, transient).
  :func:`backend_retry` turns both kinds of stderr line into a run-log note.
- **``--stdin-from-command``** (0.17+) is *not* used for dumps: restic would start
  pg_dump itself, so the dump could not pass our relay, which is what proves a
  stream complete on every version: the end-of-stream gate (pg_dump's trailer, and
  the manifest's restic holding its lock before the dump's lets go), the byte count
  the summary is checked against, the stall detector, pg_dump's stderr kept apart
  from restic's, and the snapshot opened while restic starts (pg_dump's argv names
  it). restic would only check pg_dump's exit status, which the relay checks too.
  One design for both versions, the stronger one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from labkeeper import process
from labkeeper.errors import CommandError, ConfigError, LabkeeperError, TransientError
from labkeeper.process import ExitCode, ExitCodeTable
from labkeeper.secrets import REDACTOR

RESTIC = "restic"
BINARY_ENV = "LABKEEPER_RESTIC"
"""Environment variable naming the restic binary labkeeper runs (default: ``restic``)."""
RETRY_LOCK_SECONDS = 30.0
"""How long maintenance commands let restic (0.16+) retry a conflicting lock itself."""


def default_binary() -> str:
    """The restic labkeeper runs: ``$LABKEEPER_RESTIC``, else ``restic`` on PATH."""
    return os.environ.get(BINARY_ENV) or RESTIC

LOCK_FAILED = "failed to lock repository"

# https://restic.readthedocs.io/en/stable/075_scripting.html#exit-codes
EXIT_CODES = ExitCodeTable("restic", {
    0: ExitCode("success", "ok"),
    1: ExitCode("fatal error", "permanent"),
    3: ExitCode("some source data could not be read (snapshot incomplete)", "warning"),
    10: ExitCode("repository does not exist", "permanent"),
    11: ExitCode(LOCK_FAILED, "transient"),
    12: ExitCode("wrong password", "permanent"),
    130: ExitCode("interrupted", "transient"),
})

# restic < 0.17 exits 1 for these; recognise them by their message.
_STDERR_MEANINGS: tuple[tuple[re.Pattern[str], str, bool], ...] = (
    (re.compile(r"wrong password or no key found"), "wrong password", False),
    (re.compile(r"unable to open config file|Is there a repository at the following location"),
     "repository does not exist", False),
    (re.compile(r"unable to create lock|repository is already locked"), LOCK_FAILED, True),
    (re.compile(r"connection refused|connection reset|i/o timeout|TLS handshake timeout|"
                r"no such host|503 Service Unavailable|500 Internal Server Error"),
     "repository backend unreachable", True),
)


def exit_error_message(stderr: str) -> str | None:
    """The message of restic's JSON ``exit_error`` line (restic >= 0.17 with
    ``--json``: ``{"message_type":"exit_error","code":10,"message":"..."}``), or None."""
    for line in reversed(stderr.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and "exit_error" in line):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("message_type") == "exit_error":
            return str(data.get("message", ""))
    return None


def _meaning_from_stderr(text: str) -> tuple[str, bool] | None:
    for pattern, meaning, transient in _STDERR_MEANINGS:
        if pattern.search(text):
            return meaning, transient
    return None


def classify_failure(err: CommandError) -> CommandError:
    """Refine a restic CommandError: the meaning of an exit 1 from its stderr (0.14
    exits 1 where 0.17+ exits 10/11/12), the message from restic's JSON
    ``exit_error`` line when there is one (0.17+ with ``--json``)."""
    if not err.returncode or err.returncode < 0:
        return err
    said = exit_error_message(err.stderr_tail)
    found = _meaning_from_stderr(said if said is not None else err.stderr_tail) \
        if err.returncode == 1 else None
    if found is None and said is None:
        return err
    meaning, transient = found or (err.meaning, err.transient)
    if said is not None:
        last = " | ".join(ln.strip() for ln in said.splitlines() if ln.strip())[:400]
    else:
        last = err.stderr_tail.splitlines()[-1] if err.stderr_tail else ""
    message = f"restic: {meaning}"
    if last:
        message += f": {last}"
    return CommandError(message, argv=err.argv, returncode=err.returncode,
                        stderr_tail=err.stderr_tail, meaning=meaning, transient=transient)


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

    def base_argv(self) -> tuple[str, ...]:
        argv: tuple[str, ...] = (self.program,)
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


def version_argv(binary: str | None = None) -> tuple[str, ...]:
    return (binary or default_binary(), "version")


def with_retry_lock(argv: Sequence[str], seconds: float | None) -> tuple[str, ...]:
    """``argv`` with restic's global ``--retry-lock <s>s`` after the binary (restic
    0.16+); unchanged when ``seconds`` is None or 0."""
    argv = tuple(argv)
    if not seconds:
        return argv
    return (argv[0], "--retry-lock", f"{max(1, round(seconds))}s", *argv[1:])


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


@dataclass(frozen=True, order=True)
class ResticVersion:
    """A restic version and what it offers."""

    major: int
    minor: int
    patch: int

    @classmethod
    def parse(cls, stdout: str) -> ResticVersion:
        a, b, c = (int(x) for x in parse_version(stdout).split("."))
        return cls(a, b, c)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def retry_lock(self) -> bool:
        """``--retry-lock`` (0.16.0)."""
        return (self.major, self.minor) >= (0, 16)

    @property
    def exit_codes(self) -> bool:
        """Exit codes 10 (no repository), 11 (lock failed), 12 (wrong password) and
        JSON ``exit_error`` messages (0.17.0); older versions exit 1 for all three."""
        return (self.major, self.minor) >= (0, 17)

    @property
    def stdin_from_command(self) -> bool:
        """``backup --stdin-from-command`` (0.17.0; deliberately unused, see the module)."""
        return (self.major, self.minor) >= (0, 17)


_HEX_ID = re.compile(r"[0-9a-f]{8,64}")


def is_full_id(snapshot_id: str) -> bool:
    return len(snapshot_id) == 64 and bool(_HEX_ID.fullmatch(snapshot_id))


def short_id(snapshot_id: str) -> str:
    """The 8-hex form restic shows (for display only; store and compare full ids)."""
    return snapshot_id[:8]


def same_id(a: str, b: str) -> bool:
    """Do two snapshot ids name the same snapshot? Full ids compare equal; a short id
    (restic 0.14's summary, manifests written before ids were canonical) matches the
    full id it is a prefix of. Never true for an empty or non-hex id."""
    if not (_HEX_ID.fullmatch(a) and _HEX_ID.fullmatch(b)):
        return False
    shorter, longer = sorted((a, b), key=len)
    return longer.startswith(shorter)


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


def version(*, timeout: float = 15, binary: str | None = None) -> str:
    return str(version_info(binary, timeout=timeout))


def version_info(binary: str | None = None, *, timeout: float = 15) -> ResticVersion:
    """The version of ``binary`` (default :func:`default_binary`), read by running
    ``restic version`` once per binary file (cached by path, inode and mtime, so an
    upgraded binary is read again). Raises :class:`ConfigError` when it is missing."""
    name = binary or default_binary()
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"restic binary {name!r} not found (install restic, or set "
                          f"${BINARY_ENV} to its full path)")
    st = os.stat(path)
    return _version_of(path, st.st_ino, st.st_mtime_ns, timeout)


@functools.lru_cache(maxsize=32)
def _version_of(path: str, _ino: int, _mtime_ns: int, timeout: float) -> ResticVersion:
    return ResticVersion.parse(run_restic(None, version_argv(path), timeout=timeout).stdout)


def repo_version(repo: Repo) -> ResticVersion:
    return version_info(repo.binary)


def full_snapshot_id(repo: Repo, snapshot_id: str, *, timeout: float = 120) -> str:
    """The full 64-hex id of the snapshot ``snapshot_id`` (full or a short prefix)
    names: returned as it is when full, else looked up with ``restic snapshots``."""
    if is_full_id(snapshot_id):
        return snapshot_id
    if not _HEX_ID.fullmatch(snapshot_id):
        raise ValueError(f"not a restic snapshot id: {snapshot_id!r}")
    res = run_restic(repo, (*snapshots_argv(repo), snapshot_id), timeout=timeout)
    found = [s.id for s in parse_snapshots(res.stdout) if s.id.startswith(snapshot_id)]
    if len(found) != 1:
        raise CommandError(f"restic: snapshot {snapshot_id} not found (or not unique: "
                           f"{len(found)} match)", argv=res.argv, returncode=0)
    return found[0]


def canonical_summary(repo: Repo, summary: BackupSummary, *,
                      timeout: float = 120) -> BackupSummary:
    """``summary`` naming its snapshot by the full id, whatever the restic version."""
    if is_full_id(summary.snapshot_id):
        return summary
    full = full_snapshot_id(repo, summary.snapshot_id, timeout=timeout)
    return summary.model_copy(update={"snapshot_id": full})


def init(repo: Repo, *, timeout: float = 120) -> None:
    run_restic(repo, init_argv(repo), timeout=timeout)


def snapshots(repo: Repo, *, timeout: float = 120, tags: Sequence[str] = ()) -> list[Snapshot]:
    res = run_restic(repo, snapshots_argv(repo, tags=tags), timeout=timeout)
    return parse_snapshots(res.stdout)


def repo_config(repo: Repo, *, timeout: float = 60) -> RepoConfig:
    res = run_restic(repo, cat_config_argv(repo), timeout=timeout)
    return RepoConfig.model_validate_json(res.stdout)


# =====================================================================================
# Backups from a stream, locks, forget/prune/check (issue 4)
# =====================================================================================

SNAPSHOT_TAG_SEPARATOR = ","


def check_tag(tag: str) -> str:
    """A restic tag may not contain ',' (restic splits ``--tag a,b``) or whitespace."""
    if not tag or "," in tag or any(c.isspace() for c in tag):
        raise ValueError(f"not a usable restic tag: {tag!r}")
    return tag


def backup_stdin_argv(repo: Repo, *, filename: str, host: str, tags: Sequence[str],
                      compression: str | None = "auto") -> tuple[str, ...]:
    """``restic backup --stdin``: the stream becomes one file ``/<filename>``."""
    if "/" in filename or not filename:
        raise ValueError(f"stdin filename must be a plain file name, got {filename!r}")
    argv = (*repo.base_argv(),)
    if compression:
        argv += ("--compression", compression)
    argv += ("backup", "--stdin", "--stdin-filename", filename, "--host", host, "--json")
    for t in tags:
        argv += ("--tag", check_tag(t))
    return argv


def snapshots_filter_argv(repo: Repo, *, tags: Sequence[str] = (), host: str | None = None
                          ) -> tuple[str, ...]:
    """``restic snapshots`` keeping only snapshots that carry *all* of ``tags``."""
    argv = (*repo.base_argv(), "snapshots", "--json", "--no-lock")
    if tags:
        argv += ("--tag", SNAPSHOT_TAG_SEPARATOR.join(check_tag(t) for t in tags))
    if host:
        argv += ("--host", host)
    return argv


def forget_ids_argv(repo: Repo, ids: Sequence[str]) -> tuple[str, ...]:
    if not ids:
        raise ValueError("forget needs at least one snapshot id")
    return (*repo.base_argv(), "forget", *ids)


def forget_policy_argv(repo: Repo, *, keep: Sequence[str], host: str, tags: Sequence[str],
                       dry_run: bool = False) -> tuple[str, ...]:
    """``restic forget`` of one series: the snapshots of ``host`` carrying all ``tags``
    form one group (``--group-by host``), whatever their per-run tags or paths."""
    if not keep:
        raise ValueError("a forget policy must keep something")
    argv = (*repo.base_argv(), "forget", "--json", "--host", host,
            "--tag", SNAPSHOT_TAG_SEPARATOR.join(check_tag(t) for t in tags),
            "--group-by", "host", *keep)
    if dry_run:
        argv += ("--dry-run",)
    return argv


def prune_argv(repo: Repo, *, dry_run: bool = False) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "prune")
    if dry_run:
        argv += ("--dry-run",)
    return argv


def check_argv(repo: Repo, *, read_data_subset: str | None = None) -> tuple[str, ...]:
    argv = (*repo.base_argv(), "check")
    if read_data_subset:
        argv += (f"--read-data-subset={read_data_subset}",)
    return argv


def list_locks_argv(repo: Repo) -> tuple[str, ...]:
    return (*repo.base_argv(), "list", "locks", "--no-lock")


def cat_lock_argv(repo: Repo, lock_id: str) -> tuple[str, ...]:
    return (*repo.base_argv(), "cat", "lock", lock_id, "--no-lock")


def unlock_argv(repo: Repo) -> tuple[str, ...]:
    """Removes *stale* locks only (never ``--remove-all``)."""
    return (*repo.base_argv(), "unlock")


def ls_argv(repo: Repo, snapshot_id: str) -> tuple[str, ...]:
    return (*repo.base_argv(), "ls", "--json", "--no-lock", snapshot_id)


def dump_argv(repo: Repo, snapshot_id: str, path: str) -> tuple[str, ...]:
    return (*repo.base_argv(), "dump", "--no-lock", snapshot_id, path)


class BackupSummary(BaseModel):
    """The final ``--json`` line of ``restic backup``. ``data_added`` is uncompressed
    in restic 0.14 (the bytes really stored are smaller when compression is on)."""

    model_config = ConfigDict(extra="ignore")

    message_type: str
    snapshot_id: str
    """Full (0.17+) or short (0.14) here; :func:`canonical_summary` makes it full."""
    data_added: int = 0
    data_added_packed: int | None = None
    """Bytes really added to the repository, after compression (restic 0.17+ only)."""
    total_bytes_processed: int = 0
    total_duration: float = 0.0
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0

    @property
    def files(self) -> int:
        return self.files_new + self.files_changed + self.files_unmodified


def stdin_summary_problem(summary: BackupSummary, nbytes: int) -> str | None:
    """Why the summary of a ``restic backup --stdin`` does not prove a snapshot of
    exactly one file holding the ``nbytes`` bytes sent; None when it does.

    restic prints the summary only after the snapshot was saved, and for ``--stdin``
    ``total_bytes_processed`` counts the bytes it read: equal to what we sent, the
    stored file is the whole stream (``restic ls`` would report the same)."""
    if not re.fullmatch(r"[0-9a-f]{8,64}", summary.snapshot_id):
        return f"restic reported no usable snapshot id ({summary.snapshot_id!r})"
    if summary.files != 1:
        return f"restic stored {summary.files} files, not the one stdin file"
    if summary.total_bytes_processed != nbytes:
        return (f"restic stored {summary.total_bytes_processed} bytes but {nbytes} were "
                f"sent (snapshot {summary.snapshot_id})")
    return None


def parse_backup_summary(stdout: str) -> BackupSummary:
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and data.get("message_type") == "summary":
            return BackupSummary.model_validate(data)
    raise ValueError("restic backup printed no summary line (no snapshot was reported)")


class LsNode(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = ""
    type: str = ""
    path: str = ""
    size: int | None = None
    struct_type: str = ""


_BACKEND_RETRY_RE = re.compile(
    r"^(?P<call>\S.*?) returned error, retrying after (?P<after>\S+?): (?P<error>.*)$")
_BACKEND_FAILED_RE = re.compile(
    r"^(?P<call>[A-Z][A-Za-z]*\(<[a-z]+/[0-9a-f]+>.*?\)) failed: (?P<error>.*)$")


def backend_retry(line: str) -> str | None:
    """restic's stderr note that a repository backend call failed, as one short line
    for the run log; None for any other line.

    restic 0.14 retries even a file that is gone for good (the lock of a restic that
    just finished) about ten times over some 45 s (``Load(<lock/…>, 0, 0) returned
    error, retrying after 552ms: …``), and ``restic backup`` does so twice (measured:
    20 retries, 94 s, then it went on). restic 0.18 does not retry a missing file: it
    says ``Load(<lock/…>, 0, 0) failed: …`` and its lock check tries again after 5, 15
    and 35 s, then fails. Either way a slow run names its cause with these."""
    line = line.strip()
    m = _BACKEND_RETRY_RE.match(line)
    if m is not None:
        return (f"restic is retrying {m['call']} after {m['after']}: "
                f"{REDACTOR.redact(m['error'])[:200]}")
    m = _BACKEND_FAILED_RE.match(line)
    if m is not None:
        return f"restic could not {m['call']}: {REDACTOR.redact(m['error'])[:200]}"
    return None


def parse_ls(stdout: str) -> list[LsNode]:
    nodes = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        data = json.loads(line)
        if data.get("struct_type") == "node":
            nodes.append(LsNode.model_validate(data))
    return nodes


class LockInfo(BaseModel):
    """A lock file's content (``restic cat lock``)."""

    model_config = ConfigDict(extra="ignore")

    id: str = ""
    time: datetime
    exclusive: bool = False
    hostname: str = ""
    username: str = ""
    pid: int = 0


def parse_lock(lock_id: str, stdout: str) -> LockInfo:
    info = LockInfo.model_validate_json(stdout)
    return info.model_copy(update={"id": lock_id})


def lock_is_stale(lock: LockInfo, *, now: datetime, this_host: str, stale_after: float,
                  pid_alive: Callable[[int], bool]) -> tuple[bool, str]:
    """Is a lock left by a dead run? ``(stale, why)``.

    Stale when its process is gone (only knowable for locks taken on this host),
    or when it is older than ``stale_after`` seconds (any host; restic refreshes a
    live lock every 5 minutes, so a live one never gets that old).
    """
    age = (now - lock.time).total_seconds()
    if lock.hostname == this_host and lock.pid and not pid_alive(lock.pid):
        return True, f"its process {lock.pid} on {lock.hostname} is gone"
    if age > stale_after:
        return True, f"it is {age / 60:.0f} min old (threshold {stale_after / 60:.0f} min)"
    return False, f"held by pid {lock.pid} on {lock.hostname}, {age:.0f} s old"


def describe_lock(lock: LockInfo) -> str:
    kind = "exclusive" if lock.exclusive else "shared"
    return (f"{kind} lock {lock.id[:8]} of {lock.username or '?'}@{lock.hostname} pid "
            f"{lock.pid} since {lock.time.isoformat(timespec='seconds')}")


class ForgetGroup(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tags: list[str] | None = None
    host: str = ""
    paths: list[str] | None = None
    keep: list[Snapshot] | None = None
    remove: list[Snapshot] | None = None


def parse_forget(stdout: str) -> list[ForgetGroup]:
    """``restic forget --json`` prints one JSON array (groups with keep/remove)."""
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("["):
            data = json.loads(line)
            return [ForgetGroup.model_validate(g) for g in (data or [])]
    return []


# -- runners: locks, forget, verification ---------------------------------------------

def pid_alive(pid: int) -> bool:
    """True when a process with this PID exists on this machine (zombies count as gone)."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


CAT_LOCK_TIMEOUT = 15.0
"""restic 0.14 retries loading a missing file for about a minute: a lock released
between ``list locks`` and ``cat lock`` would cost that long; such a lock is gone."""


def list_locks(repo: Repo, *, timeout: float = 60) -> list[LockInfo]:
    res = run_restic(repo, list_locks_argv(repo), timeout=timeout)
    out = []
    for lock_id in (line.strip() for line in res.stdout.splitlines()):
        if not re.fullmatch(r"[0-9a-f]{64}", lock_id):
            continue
        try:
            cat = run_restic(repo, cat_lock_argv(repo, lock_id),
                             timeout=min(timeout, CAT_LOCK_TIMEOUT))
        except CommandError:
            continue  # released between list and cat (or restic kept retrying to load it)
        out.append(parse_lock(lock_id, cat.stdout))
    return out


def unlock(repo: Repo, *, timeout: float = 60) -> None:
    run_restic(repo, unlock_argv(repo), timeout=timeout)


def note_blocking(blocking: Sequence[tuple[LockInfo, str]], *, deadline: float, wait: float,
                  waited: set[str], notes: list[str], log: Callable[[str], None]) -> None:
    """One round of waiting on live conflicting locks: past ``deadline`` a transient
    error naming them; otherwise each lock not yet waited on noted (and logged) once."""
    import time as _time

    if _time.monotonic() >= deadline:
        held = "; ".join(f"{describe_lock(lk)} ({why})" for lk, why in blocking)
        raise TransientError(f"repository still locked after waiting {wait:.0f} s: {held}")
    for lock, why in blocking:
        if lock.id not in waited:
            waited.add(lock.id)
            note = f"waiting for {describe_lock(lock)} ({why})"
            notes.append(note)
            log(note)


def wait_for_locks(repo: Repo, *, exclusive: bool, wait: float, stale_after: float,
                   log: Callable[[str], None], timeout: float = 60,
                   sleep: Callable[[float], None] | None = None) -> list[str]:
    """Get the repository ready for a command that needs a shared (``exclusive=False``)
    or an exclusive lock.

    Stale locks (dead process on this host, or older than ``stale_after`` s) are
    removed with ``restic unlock``; live conflicting locks are waited on with
    exponential backoff (1 s doubling to 30 s) up to ``wait`` seconds, then a
    transient error is raised. Returns what was done, one line each (also logged).
    """
    import socket
    import time as _time


    sleeper = sleep or _time.sleep
    this_host = socket.gethostname()
    notes: list[str] = []
    deadline = _time.monotonic() + wait
    delay = 1.0
    waited_for: set[str] = set()
    while True:
        locks = list_locks(repo, timeout=timeout)
        now = datetime.now(tz=UTC)
        stale = []
        live = []
        for lock in locks:
            is_stale, why = lock_is_stale(lock, now=now, this_host=this_host,
                                          stale_after=stale_after, pid_alive=pid_alive)
            (stale if is_stale else live).append((lock, why))
        if stale:
            unlock(repo, timeout=timeout)
            remaining = {lk.id for lk in list_locks(repo, timeout=timeout)}
            for lock, why in stale:
                if lock.id in remaining:
                    note = (f"stale {describe_lock(lock)} ({why}) could not be removed by "
                            "`restic unlock` (restic treats foreign locks as stale only "
                            "after 30 min)")
                else:
                    note = f"removed stale {describe_lock(lock)} with `restic unlock`: {why}"
                notes.append(note)
                log(note)
            live += [(lk, why) for lk, why in stale if lk.id in remaining]
        blocking = [(lk, why) for lk, why in live if exclusive or lk.exclusive]
        if not blocking:
            return notes
        note_blocking(blocking, deadline=deadline, wait=wait, waited=waited_for, notes=notes,
                      log=log)
        sleeper(min(delay, max(0.1, deadline - _time.monotonic())))
        delay = min(delay * 2, 30.0)


def find_snapshots(repo: Repo, *, tags: Sequence[str] = (), host: str | None = None,
                   timeout: float = 120) -> list[Snapshot]:
    """Snapshots carrying all of ``tags`` (and of ``host``), oldest first."""
    res = run_restic(repo, snapshots_filter_argv(repo, tags=tags, host=host), timeout=timeout)
    return sorted(parse_snapshots(res.stdout), key=lambda s: s.time)


def retry_lock_for(repo: Repo, seconds: float | None = RETRY_LOCK_SECONDS) -> float | None:
    """``seconds`` when this repository's restic has ``--retry-lock``, else None."""
    return seconds if seconds and repo_version(repo).retry_lock else None


def forget_ids(repo: Repo, ids: Sequence[str], *, timeout: float = 300,
               retry_lock: float | None = RETRY_LOCK_SECONDS) -> None:
    argv = with_retry_lock(forget_ids_argv(repo, ids), retry_lock_for(repo, retry_lock))
    run_restic(repo, argv, timeout=timeout)


def ls(repo: Repo, snapshot_id: str, *, timeout: float = 120) -> list[LsNode]:
    return parse_ls(run_restic(repo, ls_argv(repo, snapshot_id), timeout=timeout).stdout)


def dump_file(repo: Repo, snapshot_id: str, path: str, *, timeout: float = 300) -> str:
    """A (small) file of a snapshot as text: manifests, not dumps."""
    return run_restic(repo, dump_argv(repo, snapshot_id, path), timeout=timeout).stdout


def backup_bytes(repo: Repo, data: bytes, *, filename: str, host: str, tags: Sequence[str],
                 compression: str | None = "auto", timeout: float = 300) -> BackupSummary:
    """Store a small in-memory file (a manifest) as its own ``--stdin`` snapshot."""
    res = run_restic(repo, backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                                             compression=compression),
                     timeout=timeout, input=data)
    return canonical_summary(repo, parse_backup_summary(res.stdout))


class PendingBackup:
    """``restic backup --stdin`` started ahead of its (small) data, so its start-up —
    key derivation, lock, index load: most of a small backup's time — overlaps other
    work. :meth:`finish` hands it the data and closes its stdin; :meth:`abort`
    SIGKILLs it before any end-of-stream, so it never stores a snapshot (it may leave
    a stale lock: ``restic unlock`` removes it).

    The data is written by a helper thread, and restic's stdout (its ``--json``
    status lines, then the summary) is read continuously, so neither side blocks
    on a full pipe however long the wait is.

    ``nice`` > 0 starts restic through ``nice -n <nice>`` (every thread of it, from
    its start): its start-up then takes only CPU the work it overlaps leaves idle.

    :meth:`prime` hands restic the data's first bytes early; :meth:`wait_reading`
    then tells when restic has read them, which it does only once it has opened the
    repository, taken its lock and loaded the index.
    """

    def __init__(self, repo: Repo, *, filename: str, host: str, tags: Sequence[str],
                 compression: str | None = "auto", nice: int = 0,
                 on_stderr_line: process.LineCallback | None = None) -> None:
        import shutil
        import threading

        self.filename = filename
        self._repo = repo
        self.argv = backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                                      compression=compression)
        spawn = self.argv
        if nice > 0 and shutil.which("nice"):
            spawn = ("nice", "-n", str(nice), *self.argv)
        self._proc = process.Coprocess(spawn, env=repo.env(), on_stderr_line=on_stderr_line)
        self._primed = b""
        self._stdout: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name="restic-pending-stdout",
                                        daemon=True)
        self._reader.start()
        self.finished = False

    def _read(self) -> None:
        import os

        fd = self._proc.stdout.fileno()
        kept = 0
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except OSError:
                return
            if not chunk:
                return
            self._stdout.append(chunk)
            kept += len(chunk)
            while kept > process.CAPTURE_LIMIT and len(self._stdout) > 1:
                kept -= len(self._stdout.pop(0))  # only the summary at the end matters

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    @property
    def pid(self) -> int:
        """restic's process id (``nice`` execs it: the same process)."""
        return self._proc.pid

    def prime(self, prefix: bytes) -> None:
        """Write the data's first bytes now (the data :meth:`finish` gets must start
        with them). At most ``PIPE_BUF`` bytes, so the write never blocks."""
        import os
        import select

        if self.finished or self._primed:
            raise RuntimeError("prime() comes once, before finish() or abort()")
        if not 0 < len(prefix) <= select.PIPE_BUF:
            raise ValueError(f"prefix must be 1..{select.PIPE_BUF} bytes, got {len(prefix)}")
        self._primed = prefix
        try:
            os.write(self._proc.stdin.fileno(), prefix)
        except OSError:
            pass  # restic already died: finish() reports how

    def wait_reading(self, timeout: float) -> bool:
        """Wait until restic has read the primed bytes: it is then past its lock and
        index load. False when it exited first or ``timeout`` seconds passed."""
        import array
        import fcntl
        import termios

        if not self._primed or self.finished:
            raise RuntimeError("wait_reading() needs prime() first, before finish()")
        fd = self._proc.stdin.fileno()
        unread = array.array("i", [0])
        deadline = time.monotonic() + timeout
        while self._proc.poll() is None:
            try:
                fcntl.ioctl(fd, termios.FIONREAD, unread)
            except OSError:
                return False
            if unread[0] == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return False

    def finish(self, data: bytes, *, timeout: float) -> BackupSummary:
        """Send ``data`` as the whole file, end the stream and return restic's summary
        (checked like a streamed backup's: one file of exactly ``len(data)`` bytes).
        Raises :class:`CommandError` (typed, classified) when restic fails or times out;
        restic is then stopped."""
        import threading

        from labkeeper.errors import CommandTimeout

        if self.finished:
            raise RuntimeError("this backup was already finished or aborted")
        if not data.startswith(self._primed):
            raise ValueError("data does not start with the bytes prime() sent")
        self.finished = True
        feeder = threading.Thread(target=_write_and_close,
                                  args=(self._proc.stdin, data[len(self._primed):]),
                                  name="restic-pending-stdin", daemon=True)
        feeder.start()
        timed_out = self._proc.wait(timeout) is None
        if timed_out:
            self._proc.kill()
        self._proc.wait()
        feeder.join(timeout=5)
        self._reader.join(timeout=5)  # before close(): its fd must not be reused under it
        res = self._proc.result(EXIT_CODES)
        self._proc.close(kill=True)
        if timed_out:
            raise CommandTimeout(f"restic backup of {self.filename} timed out after "
                                 f"{timeout:g}s", argv=REDACTOR.redact_argv(self.argv),
                                 timeout=timeout)
        if not res.ok:
            raise classify_failure(process.make_error(res))
        summary = parse_backup_summary(b"".join(self._stdout).decode("utf-8", "replace"))
        problem = stdin_summary_problem(summary, len(data))
        if problem is not None:
            raise CommandError(f"restic backup: {problem}", argv=res.argv,
                               returncode=res.returncode)
        return canonical_summary(self._repo, summary, timeout=timeout)

    def abort(self) -> bool:
        """SIGKILL restic before it got end-of-stream (no snapshot). Returns whether it
        may have left a stale lock: it was still running, or a signal had killed it."""
        if self.finished:
            return False
        self.finished = True
        was_running = self.running
        self._proc.kill()
        rc = self._proc.wait()
        self._reader.join(timeout=5)  # before close(): its fd must not be reused under it
        self._proc.close(kill=True)
        return was_running or (rc is not None and rc < 0)


def _write_and_close(pipe: Any, data: bytes) -> None:
    import contextlib

    try:
        pipe.write(data)
        pipe.flush()
    except (BrokenPipeError, OSError, ValueError):
        pass  # restic died or was killed: its exit status tells why
    finally:
        with contextlib.suppress(OSError, ValueError):
            pipe.close()


# -- streaming a producer into `restic backup --stdin`, owning end-of-stream ----------------

Gate = process.EofGate
"""Decides at the producer's clean exit whether the stream is complete:
``gate(tail_bytes, total_bytes)`` returns None (complete) or why it is not."""

TAIL_BYTES = process.GATE_TAIL_BYTES


class StreamFailed(LabkeeperError):
    """Streaming a producer into restic failed; restic never saw a clean EOF unless
    ``eof_given`` (then restic itself failed afterwards)."""

    def __init__(self, message: str, *, transient: bool, cause: str,
                 producer: process.CommandResult | None = None,
                 consumer: process.CommandResult | None = None,
                 eof_given: bool = False, bytes_relayed: int = 0,
                 locked: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.cause = cause
        """``producer`` | ``incomplete`` | ``consumer`` | ``stall`` | ``timeout``"""
        self.producer = producer
        self.consumer = consumer
        self.eof_given = eof_given
        self.bytes_relayed = bytes_relayed
        self.locked = locked
        """restic could not lock the repository (another run holds an exclusive lock);
        it stopped before reading anything, so it left neither lock nor snapshot."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_stream_failed, (self.message, self.transient, self.cause,
                                         self.eof_given, self.bytes_relayed, self.locked))


def _rebuild_stream_failed(message: str, transient: bool, cause: str, eof_given: bool,
                           nbytes: int, locked: bool = False) -> StreamFailed:
    return StreamFailed(message, transient=transient, cause=cause, eof_given=eof_given,
                        bytes_relayed=nbytes, locked=locked)


@dataclass(frozen=True)
class StreamResult:
    summary: BackupSummary
    bytes: int
    duration: float
    producer: process.CommandResult
    consumer: process.CommandResult


def stream_backup(repo: Repo, producer: process.Stage | process.StageFactory, *,
                  filename: str, host: str,
                  tags: Sequence[str], gate: Gate, timeout: float,
                  compression: str | None = "auto", stall_timeout: float = 300.0,
                  on_stderr_line: process.LineCallback | None = None) -> StreamResult:
    """Stream ``producer``'s stdout into ``restic backup --stdin`` with no temporary file.

    A two-stage :func:`labkeeper.process.pipeline` whose producer carries ``gate`` as
    its end-of-stream gate: restic's stdin is closed while restic lives only after the
    producer exited with an ok code *and* ``gate(tail, nbytes)`` accepted the stream.
    On any failure restic is SIGKILLed before EOF (it then leaves a stale lock and
    maybe unreferenced packs, never a snapshot). If restic accepts no data for
    ``stall_timeout`` seconds (its backend is down), both are killed. Raises
    :class:`StreamFailed`.

    ``producer`` may be a factory (:data:`labkeeper.process.StageFactory`): restic
    then starts first and the factory's work overlaps restic's start-up; what the
    factory raises propagates (restic was killed before any input).

    ``on_stderr_line`` gets restic's stderr line by line as it comes.
    """
    consumer_argv = backup_stdin_argv(repo, filename=filename, host=host, tags=tags,
                                      compression=compression)
    first: process.Stage | process.StageFactory
    if isinstance(producer, process.Stage):
        first = dataclasses.replace(producer, eof_gate=gate)
    else:
        def first() -> process.Stage:
            return dataclasses.replace(producer(), eof_gate=gate)
    res = process.pipeline(
        [first, process.Stage(consumer_argv, codes=EXIT_CODES, env=repo.env(),
                              on_stderr_line=on_stderr_line)],
        timeout=timeout, stall_timeout=stall_timeout, check=False)
    p_res, c_res = res.stages
    nbytes = res.bytes_relayed[0]
    eof_given = res.eof_given[0]
    refused = res.refused[0]
    restic_said = c_res.stderr_tail(3).replace("\n", " | ")
    what = p_res.argv[0]
    if res.stalled:
        raise StreamFailed(
            f"restic accepted no data for {stall_timeout:g} s (repository backend "
            f"unreachable?); stopped it before end-of-stream, no snapshot was finalised"
            + (f". restic: {restic_said}" if restic_said else ""),
            transient=True, cause="stall", producer=p_res, consumer=c_res,
            eof_given=eof_given, bytes_relayed=nbytes)
    if res.timed_out:
        raise StreamFailed(
            f"{what} | restic backup timed out after {timeout:g} s; restic was stopped "
            "before end-of-stream, no snapshot was finalised",
            transient=True, cause="timeout", producer=p_res, consumer=c_res,
            eof_given=eof_given, bytes_relayed=nbytes)
    if refused is not None:
        raise StreamFailed(
            f"{what} exited {p_res.returncode} but its output is incomplete ({refused}); "
            "restic was stopped before end-of-stream, no snapshot was finalised",
            transient=False, cause="incomplete", producer=p_res, consumer=c_res,
            bytes_relayed=nbytes)
    if res.cause == 0:
        err = process.make_error(p_res)
        transient = any(s in p_res.stderr for s in _PRODUCER_TRANSIENT)
        raise StreamFailed(
            f"{err} — restic was stopped before end-of-stream after {nbytes} bytes, "
            "no snapshot was finalised",
            transient=transient, cause="producer", producer=p_res, consumer=c_res,
            bytes_relayed=nbytes)
    if c_res.returncode != 0 or not eof_given:
        err = classify_failure(process.make_error(c_res)) if c_res.returncode else None
        why = str(err) if err else f"restic exited {c_res.returncode}"
        raise StreamFailed(
            f"{why} (after {nbytes} bytes of {what}'s output"
            + ("" if eof_given else "; it never received end-of-stream") + ")",
            transient=bool(err and err.transient), cause="consumer", producer=p_res,
            consumer=c_res, eof_given=eof_given, bytes_relayed=nbytes,
            locked=bool(err and err.meaning == LOCK_FAILED))
    try:
        summary = parse_backup_summary(c_res.stdout)
    except ValueError as exc:
        raise StreamFailed(str(exc), transient=False, cause="consumer", producer=p_res,
                           consumer=c_res, eof_given=True, bytes_relayed=nbytes) from None
    problem = stdin_summary_problem(summary, nbytes)
    if problem is not None:
        raise StreamFailed(problem, transient=False, cause="consumer", producer=p_res,
                           consumer=c_res, eof_given=True, bytes_relayed=nbytes)
    try:
        summary = canonical_summary(repo, summary)
    except (LabkeeperError, ValueError) as exc:
        raise StreamFailed(f"snapshot {summary.snapshot_id} saved, but its full id could "
                           f"not be read: {exc}", transient=getattr(exc, "transient", False),
                           cause="consumer", producer=p_res, consumer=c_res, eof_given=True,
                           bytes_relayed=nbytes) from None
    return StreamResult(summary=summary, bytes=nbytes, duration=res.duration,
                        producer=p_res, consumer=c_res)


_PRODUCER_TRANSIENT = ("could not connect", "Connection refused", "server closed the connection",
                       "timeout expired", "the database system is starting up",
                       "the database system is shutting down", "too many clients",
                       "connection to server", "terminating connection")


def forget_policy(repo: Repo, *, keep: Sequence[str], host: str, tags: Sequence[str],
                  dry_run: bool = False, timeout: float = 600) -> list[ForgetGroup]:
    """Apply a keep policy to one series; returns restic's keep/remove groups."""
    argv = forget_policy_argv(repo, keep=keep, host=host, tags=tags, dry_run=dry_run)
    res = run_restic(repo, with_retry_lock(argv, retry_lock_for(repo)), timeout=timeout)
    return parse_forget(res.stdout)


def prune(repo: Repo, *, dry_run: bool = False, timeout: float = 6 * 3600,
          on_line: process.LineCallback | None = None) -> str:
    """``restic prune``; ``on_line`` gets its output lines (stdout and stderr) as they
    come (restic 0.16+ prints "repo already locked, waiting up to 30s for the lock" on
    stdout while it waits)."""
    argv = with_retry_lock(prune_argv(repo, dry_run=dry_run), retry_lock_for(repo))
    return run_restic(repo, argv, timeout=timeout, on_stdout_line=on_line,
                      on_stderr_line=on_line).stdout


def check(repo: Repo, *, read_data_subset: str | None = None,
          timeout: float = 6 * 3600) -> str:
    argv = with_retry_lock(check_argv(repo, read_data_subset=read_data_subset),
                           retry_lock_for(repo))
    return run_restic(repo, argv, timeout=timeout).stdout
