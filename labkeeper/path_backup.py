"""File backups: restic running *on the host that holds the files*, driven over SSH.

One path set (:func:`backup_path_set`), e.g. ``photos`` on ``nas``:

1. **restic on the host.** ``restic version`` runs on the host first: missing →
   :class:`ResticMissing` naming the host and how to install it; older than
   :data:`MIN_RESTIC` → the same, with the version found.
2. **Locks.** Locks are listed (controller-side restic); a lock is stale when its
   process is gone *on the host that took it* (checked over SSH on the backup host)
   or it is older than the repository's ``stale_lock_minutes``. Stale locks are
   removed by ``restic unlock`` run **on the backup host** (restic only removes a
   lock of a dead process when it runs on the host that took it). Live exclusive
   locks (forget/prune/check) are waited on with backoff up to ``lock_wait_minutes``.
3. **Backup.** ``restic backup --json --host <lab> --tag labkeeper --tag
   paths:<host>/<set> --tag kind:paths --tag backup:<attempt id> ... -- PATHS`` on
   the host. Secrets (``RESTIC_PASSWORD``, ``AWS_*``, ``RESTIC_REPOSITORY``) travel
   on the SSH channel's **stdin** to the SSH runner's fixed ``sh -c`` preamble,
   which exports them and ``exec``\\ s restic: they are never in the remote argv,
   in a shell history (no interactive shell), or in any file. (With ``sudo: true``
   the preamble itself runs under ``sudo -n``, so sudo's environment reset does not
   matter and nothing needs ``SETENV`` -- but sudoers must allow ``sh``, i.e. root.
   With ``sudo: restic`` the preamble runs as the SSH user and execs ``sudo -n
   --preserve-env=<names> -- restic ...``: sudoers allows restic alone and keeps
   those variables, see :func:`sudo_restic`.) The secrets are the repository's, or
   the path set's ``host_credentials`` (:func:`host_repo`): a restic key and bucket
   keys of the host's own.
4. **Progress** (restic's ``status`` messages) is logged at most every
   ``progress_interval`` seconds: percent, bytes, files, rate, ETA. The ``summary``
   message goes into the result (and the flow's artifact).
5. **Exit 3** (some source unreadable) is a *warning*: the snapshot is kept and the
   unreadable paths (restic's JSON ``error`` messages, deduplicated) are in the
   result. Any other non-zero exit fails.
6. **Proof.** Exactly one snapshot carries this attempt's ``backup:<id>`` tag, it
   is the one the summary named, and it holds exactly the configured paths.
7. **Nothing half-done survives.** On any failure — restic error, timeout, the SSH
   connection dropped mid-backup — the host is reached again (a fresh
   connection), any restic still running for this attempt (found by its unique
   ``backup:<id>`` argument in ``/proc/*/cmdline``) is waited for briefly (a
   restic whose SSH session died is killed by SIGPIPE at its next progress line)
   and then terminated, ``restic unlock`` runs on the host, and every snapshot
   carrying the attempt's tag is forgotten. A retry then starts a new attempt.
8. **Cleanup that could not finish is remembered.** When that cleanup is incomplete
   (the host cannot be reached again, a process survives SIGKILL, the repository
   refuses the ``forget``), a restic of the attempt may still finish on the host
   later and leave a snapshot carrying the *series* tags. The attempt is recorded as
   pending in ``<settings.state_dir>/path_backup/pending-<host>.<set>.json``
   (:class:`PendingCleanups`, written atomically under a lock). Every later backup
   of that path set sweeps it first (:func:`sweep_pending`, after connecting and
   handling locks): stop any restic of it on the host, ``restic unlock`` there,
   forget every snapshot carrying its tag; only when all of that succeeded is it
   removed from the file. If the host part fails (it cannot be made sure that no
   restic of the attempt still runs) the new backup is **not** started: the run
   fails, naming the attempt. If only the repository part fails (typically another
   run's lock blocks ``forget``) the state is known (nothing of the attempt runs any
   more) and the backup goes on, as a *warning*; the attempt stays pending.

Snapshots: ``--host <lab name>`` and the stable tags ``labkeeper``,
``paths:<host>/<set>``, ``kind:paths`` (a *series*, like a database's
``db:<server>/<name>`` series, see :func:`retention_series`), plus the per-attempt
``backup:<id>``.

**Unreadable files as root.** The local lab's "host" is this machine and the SSH
user is root, which reads a ``chmod 000`` file or directory anyway
(CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH), and restic stores FIFOs, sockets and
devices as special nodes without reading them. What restic *does* report as root:
a path longer than ``PATH_MAX`` (4096 bytes). restic lstat()s every entry by its
full path, so a directory nested deeper than that (built with ``mkdirat``) gives
``{"message_type":"error","error":{"Op":"lstat","Path":...,"Err":36},
"during":"scan"|"archival","item":...}`` (ENAMETOOLONG) on stderr and exit 3.
restic 0.14 prints these error messages on **stderr** (JSON lines) while
status/summary go to stdout; :func:`parse_message` reads both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets as pysecrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from labkeeper import pending as pending_mod
from labkeeper import restic
from labkeeper.errors import (
    CommandError,
    ConfigError,
    LabkeeperError,
    PermanentError,
    SSHConnectError,
    TransientError,
)
from labkeeper.inventory import Inventory, PathBackup
from labkeeper.pending import (  # noqa: F401 - re-exported: path_backup.PendingAttempt, ...
    PendingAttempt,
    new_pending,
    with_pending,
    without_pending,
)
from labkeeper.process import CommandResult
from labkeeper.secrets import redact
from labkeeper.ssh import ENV_PREAMBLE, SshClient, SshTarget, connect, env_block

Log = Callable[[str], None]

MIN_RESTIC = (0, 14, 0)
"""JSON error messages, ``--compression`` and repository format 2 need restic 0.14."""

INSTALL_HINT = (
    "install it on the host: `apt-get install restic` (Debian/Ubuntu, restic >= 0.14: "
    "Debian 12 or later), `dnf install restic`, `apk add restic`, or the static binary "
    "from https://github.com/restic/restic/releases (then `restic self-update`); or set "
    "path_backups[].restic_binary to its full path"
)
CLEANUP_TIMEOUT = 90.0
STOP_GRACE = 10.0
"""Seconds a restic whose SSH session died gets to notice (SIGPIPE) before SIGTERM."""
UNREADABLE_KEEP = 500
"""At most this many unreadable paths are kept (the count is always exact)."""


# -- naming (pure) -------------------------------------------------------------------------

def series_label(host: str, name: str) -> str:
    return f"paths:{host}/{name}"


def series_tags(host: str, name: str) -> list[str]:
    """The stable tags of one path set's series."""
    return ["labkeeper", series_label(host, name), "kind:paths"]


def new_backup_id(now: datetime | None = None) -> str:
    """A unique id per attempt: ``20260101T020000Z-1a2b3c`` (same form as pg_backup)."""
    now = now or datetime.now(tz=UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{pysecrets.token_hex(3)}"


def backup_tag(backup_id: str) -> str:
    return f"backup:{backup_id}"


# -- pending cleanups (pure: where, what; shared with pg_backup: labkeeper.pending) ------

PENDING_DIR = "path_backup"


def pending_owner(host: str, name: str) -> pending_mod.Owner:
    return pending_mod.Owner(PENDING_DIR, (("host", host, "host"), ("path_set", name, "path set")),
                             series_label(host, name))


def pending_path(state_dir: Path, host: str, name: str) -> Path:
    """``<state_dir>/path_backup/pending-<host>.<set>.json``: neither an inventory host
    nor a set name can hold a ``.`` (or a ``/``), so the file is one path set's alone."""
    return pending_mod.pending_path(state_dir, pending_owner(host, name))


def dump_pending(host: str, name: str, attempts: Sequence[PendingAttempt]) -> str:
    return pending_mod.dump_pending(pending_owner(host, name), attempts)


def load_pending(text: str, *, host: str, name: str) -> list[PendingAttempt]:
    """The attempts in a pending file of ``host``/``name``; ValueError when the text is
    not such a file (any other JSON, another set's, an id restic could not match)."""
    return pending_mod.load_pending(text, pending_owner(host, name))


# -- argv builders (pure) ------------------------------------------------------------------

def _base(binary: str, repo: restic.Repo) -> tuple[str, ...]:
    argv: tuple[str, ...] = (binary,)
    if repo.ca_file:  # the same path must exist on the host
        argv += ("--cacert", repo.ca_file)
    return argv


def backup_argv(pb: PathBackup, repo: restic.Repo, *, lab: str, tags: Sequence[str],
                compression: str | None = "auto") -> tuple[str, ...]:
    """``restic backup --json`` of one path set (paths after ``--``, so a path can
    never be read as an option)."""
    argv = _base(pb.restic_binary, repo)
    if compression:
        argv += ("--compression", compression)
    argv += ("backup", "--json", "--host", lab)
    for t in tags:
        argv += ("--tag", restic.check_tag(t))
    for pattern in pb.excludes:
        argv += ("--exclude", str(pattern))
    if pb.exclude_caches:
        argv += ("--exclude-caches",)
    if pb.one_file_system:
        argv += ("--one-file-system",)
    return (*argv, "--", *(str(p) for p in pb.paths))


def unlock_argv(binary: str, repo: restic.Repo) -> tuple[str, ...]:
    """Removes *stale* locks only (never ``--remove-all``)."""
    return (*_base(binary, repo), "unlock")


def version_argv(binary: str) -> tuple[str, ...]:
    return (binary, "version")


def sudo_wrap(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` under ``sudo -n`` *with the env preamble inside sudo*: the variables
    are read from stdin by the root shell, so sudo's env reset cannot drop them.
    (``sudo: true``; sudoers must allow ``sh``, which is root.)"""
    return ("sudo", "-n", "--", "sh", "-c", ENV_PREAMBLE, "labkeeper-env", *argv)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def sudo_restic(argv: Sequence[str], env_names: Sequence[str]) -> tuple[str, ...]:
    """``argv`` (restic) under ``sudo -n`` with no shell under sudo (``sudo: restic``):
    the SSH runner's preamble exports the variables as the SSH user, and sudo keeps
    only the *names* listed here (``--preserve-env=``, allowed by sudoers' env_keep
    or SETENV). Values never reach argv."""
    names = sorted(env_names)
    for n in names:
        if not _ENV_NAME.fullmatch(n):
            raise ConfigError(f"not an environment variable name: {n!r}")
    head: tuple[str, ...] = ("sudo", "-n")
    if names:
        head += (f"--preserve-env={','.join(names)}",)
    return (*head, "--", *argv)


SUDOERS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RESTIC_PASSWORD",
               "RESTIC_PROGRESS_FPS", "RESTIC_REPOSITORY")
"""The variables a ``sudo: restic`` host's sudoers must keep (see docs/ADMIN_GUIDE.md)."""


def host_repo(repo: restic.Repo, creds: Any | None, *,
              resolve_secret: Callable[[str], Any] | None = None) -> restic.Repo:
    """The repository as the *host* opens it: with ``host_credentials`` (a restic key
    and bucket keys of the host's own) instead of the repository's, when given."""
    if creds is None:
        return repo
    from dataclasses import replace

    from labkeeper.secrets import resolve

    get = resolve_secret or resolve
    changes: dict[str, Any] = {"password": get(creds.password)}
    if creds.s3 is not None:
        if not repo.url.startswith("s3:"):
            raise ConfigError(f"host_credentials.s3 given for {redact(repo.url)}, "
                              "which is not an s3: repository")
        changes["aws_access_key_id"] = get(creds.s3.access_key_id)
        changes["aws_secret_access_key"] = get(creds.s3.secret_access_key)
    return replace(repo, **changes)


def remote_env(repo: restic.Repo, *, progress_interval: float) -> dict[str, str]:
    """restic's environment on the host: the secrets it opens the repository with (see
    :func:`host_repo`), no controller paths (the host uses its own default cache),
    progress often enough for the log."""
    env = {k: v for k, v in repo.env().items() if k != "RESTIC_CACHE_DIR"}
    env["RESTIC_PROGRESS_FPS"] = progress_fps(progress_interval)
    return env


def progress_fps(interval: float) -> str:
    """At least one status line per second (restic's default is 60/s over SSH)."""
    fps = 1.0 if interval >= 1 else 1.0 / max(interval, 0.1)
    return f"{fps:g}"


# -- restic version (pure) -----------------------------------------------------------------

def parse_version_tuple(text: str) -> tuple[int, int, int]:
    v = restic.parse_version(text)
    a, b, c = (int(x) for x in v.split("."))
    return a, b, c


def check_version(result: CommandResult, *, host: str, binary: str) -> str:
    """The restic version a ``restic version`` run reported, or a :class:`ResticMissing`."""
    if result.returncode in (126, 127):
        raise ResticMissing(f"restic is not installed on {host} (`{binary} version`: "
                            f"{_last_line(result.stderr) or 'command not found'}); "
                            f"{INSTALL_HINT}", host=host)
    if result.returncode != 0:
        raise ResticMissing(f"`{binary} version` failed on {host} (exit {result.returncode}: "
                            f"{_last_line(result.stderr)}); {INSTALL_HINT}", host=host)
    try:
        found = parse_version_tuple(result.stdout)
    except ValueError:
        raise ResticMissing(f"`{binary}` on {host} is not restic (it printed "
                            f"{result.stdout[:60]!r}); {INSTALL_HINT}", host=host) from None
    shown = ".".join(map(str, found))
    if found < MIN_RESTIC:
        raise ResticMissing(f"restic {shown} on {host} is too old (need >= "
                            f"{'.'.join(map(str, MIN_RESTIC))}); {INSTALL_HINT}", host=host)
    return shown


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


# -- restic backup --json messages (pure) ----------------------------------------------------

class StatusMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_type: str = "status"
    percent_done: float = 0.0
    total_files: int = 0
    files_done: int = 0
    total_bytes: int = 0
    bytes_done: int = 0
    error_count: int = 0
    seconds_elapsed: int = 0
    seconds_remaining: int | None = None
    current_files: list[str] | None = None


class ErrorMessage(BaseModel):
    """restic 0.14: ``{"error": {"Op","Path","Err": errno}, "during", "item"}``; later
    versions add ``error.message``. The ``error`` object varies: keep it loose."""

    model_config = ConfigDict(extra="ignore")

    message_type: str = "error"
    error: dict[str, Any] | str | None = None
    during: str = ""
    item: str = ""

    @property
    def path(self) -> str:
        if self.item:
            return self.item
        if isinstance(self.error, dict):
            return str(self.error.get("Path") or self.error.get("path") or "")
        return ""

    @property
    def reason(self) -> str:
        e = self.error
        if isinstance(e, str):
            return e
        if not isinstance(e, dict):
            return "unknown error"
        if e.get("message"):
            return str(e["message"])
        op = str(e.get("Op") or "")
        errno = e.get("Err")
        text = os.strerror(errno) if isinstance(errno, int) else str(errno or "error")
        return f"{op}: {text}" if op else text


class SummaryMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    message_type: str = "summary"
    snapshot_id: str
    files_new: int = 0
    files_changed: int = 0
    files_unmodified: int = 0
    dirs_new: int = 0
    dirs_changed: int = 0
    dirs_unmodified: int = 0
    data_blobs: int = 0
    tree_blobs: int = 0
    data_added: int = 0
    total_files_processed: int = 0
    total_bytes_processed: int = 0
    total_duration: float = 0.0


Message = StatusMessage | ErrorMessage | SummaryMessage


def parse_message(line: str) -> Message | None:
    """One line of ``restic backup --json`` (stdout or stderr); None for anything else
    (plain-text warnings, ``verbose_status``)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("message_type")
    model: type[BaseModel] | None = {"status": StatusMessage, "error": ErrorMessage,
                                     "summary": SummaryMessage}.get(str(kind))
    if model is None:
        return None
    try:
        return model.model_validate(data)  # type: ignore[return-value]
    except ValidationError:
        return None


@dataclass(frozen=True)
class Unreadable:
    path: str
    reason: str
    during: str

    def short(self, width: int = 120) -> str:
        return f"{shorten_path(self.path, width)} ({self.reason})"


def shorten_path(path: str, width: int = 120) -> str:
    if len(path) <= width:
        return path
    keep = (width - 5) // 2
    return f"{path[:keep]}/…/{path[-keep:]}"


class ErrorCollector:
    """Unreadable paths from restic's error messages: deduplicated (restic reports a
    path once while scanning and once while archiving), capped, exactly counted."""

    def __init__(self, keep: int = UNREADABLE_KEEP) -> None:
        self.keep = keep
        self.items: dict[str, Unreadable] = {}
        self.count = 0
        self.other: list[str] = []

    def add(self, msg: ErrorMessage) -> None:
        path = msg.path
        if path in self.items:
            return
        self.count += 1
        if len(self.items) < self.keep:
            self.items[path] = Unreadable(path=path, reason=msg.reason, during=msg.during)

    def paths(self) -> list[Unreadable]:
        return list(self.items.values())


# -- progress (pure) -----------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def format_progress(label: str, st: StatusMessage) -> str:
    """``photos@nas: 42.1% · 1.2 GiB of 2.9 GiB · 1234 of 5000 files · 48.0 MiB/s · ETA 1m23s``"""
    parts = [f"{label}: {st.percent_done * 100:.1f}%"]
    parts.append(f"{human_bytes(st.bytes_done)} of {human_bytes(st.total_bytes)}"
                 if st.total_bytes else f"{human_bytes(st.bytes_done)} (scanning)")
    parts.append(f"{st.files_done} of {st.total_files} files")
    if st.seconds_elapsed > 0 and st.bytes_done:
        parts.append(f"{human_bytes(st.bytes_done / st.seconds_elapsed)}/s")
    if st.seconds_remaining is not None and st.percent_done < 1:
        parts.append(f"ETA {human_duration(st.seconds_remaining)}")
    if st.error_count:
        parts.append(f"{st.error_count} unreadable")
    return " · ".join(parts)


class ProgressThrottle:
    """Lets one progress line through every ``interval`` seconds (the first at once)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.last: float | None = None
        self.latest: StatusMessage | None = None
        self.emitted = 0

    def offer(self, st: StatusMessage) -> bool:
        self.latest = st
        now = self.clock()
        if self.last is None or now - self.last >= self.interval:
            self.last = now
            self.emitted += 1
            return True
        return False


# -- results and errors ----------------------------------------------------------------------

@dataclass
class PathBackupResult:
    name: str
    host: str
    backup_id: str
    status: str  # ok | warning
    snapshot_id: str
    restic_version: str
    files: int
    bytes_processed: int
    data_added: int
    files_new: int
    files_changed: int
    files_unmodified: int
    duration_s: float
    restic_s: float
    unreadable_count: int = 0
    unreadable: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def series(self) -> str:
        return series_label(self.host, self.name)

    @property
    def throughput_mb_s(self) -> float:
        return self.bytes_processed / 1e6 / self.restic_s if self.restic_s > 0 else 0.0

    def row(self) -> dict[str, Any]:
        return {
            "path set": f"{self.host}/{self.name}", "status": self.status,
            "snapshot": self.snapshot_id[:8], "files": self.files,
            "bytes": self.bytes_processed, "bytes added (uncompressed)": self.data_added,
            "new/changed/unmodified": f"{self.files_new}/{self.files_changed}/"
                                      f"{self.files_unmodified}",
            "duration s": round(self.duration_s, 2), "restic s": round(self.restic_s, 2),
            "throughput MB/s": round(self.throughput_mb_s, 1),
            "unreadable": self.unreadable_count, "restic": self.restic_version,
            "backup id": self.backup_id,
            "notes": redact("; ".join(self.notes)),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ResticMissing(PermanentError):
    """restic is not installed (or too old) on the backup host."""

    def __init__(self, message: str, *, host: str = "") -> None:
        super().__init__(message)
        self.host = host

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_missing, (self.message, self.host))


def _rebuild_missing(message: str, host: str) -> ResticMissing:
    return ResticMissing(message, host=host)


class PathBackupFailed(LabkeeperError):
    """One path set's backup failed; nothing of this attempt is left counted as good."""

    def __init__(self, message: str, *, transient: bool = False, path_set: str = "",
                 backup_id: str = "") -> None:
        super().__init__(redact(message), transient=transient)
        self.path_set = path_set
        self.backup_id = backup_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_failed, (self.message, self.transient, self.path_set, self.backup_id))


def _rebuild_failed(message: str, transient: bool, path_set: str, backup_id: str
                    ) -> PathBackupFailed:
    return PathBackupFailed(message, transient=transient, path_set=path_set,
                            backup_id=backup_id)


class AttemptStillRunning(TransientError):
    """A process of a failed attempt still runs on the host after SIGKILL."""


# -- remote processes of one attempt ---------------------------------------------------------

ATTEMPT_PIDS_SCRIPT = (
    'for d in /proc/[0-9]*; do p=${d#/proc/}; '
    '[ "$p" = "$$" ] && continue; [ "$p" = "$PPID" ] && continue; '
    'if tr "\\000" "\\n" < "$d/cmdline" 2>/dev/null | grep -qxF -e "$1"; then echo "$p"; fi; '
    'done; exit 0'
)
"""Prints the PIDs whose argv holds ``$1`` as one whole argument (the attempt's unique
``backup:<id>`` tag), skipping itself and its ``timeout`` wrapper. A fixed script: the
tag arrives as ``$1``, never inside the script text."""


def attempt_pids_argv(tag: str) -> tuple[str, ...]:
    return ("sh", "-c", ATTEMPT_PIDS_SCRIPT, "labkeeper-pids", restic.check_tag(tag))


def parse_pids(stdout: str) -> list[int]:
    return sorted({int(x) for x in stdout.split() if x.isdigit()})


def attempt_pids(client: SshClient, tag: str, *, timeout: float = 30) -> list[int]:
    return parse_pids(client.run(attempt_pids_argv(tag), timeout=timeout).stdout)


def stop_attempt(client: SshClient, tag: str, *, grace: float = STOP_GRACE,
                 sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """Make sure no process of this attempt still runs on the host: wait ``grace``
    seconds (a restic whose SSH session died gets SIGPIPE at its next status line),
    then SIGTERM (restic removes its lock), then SIGKILL. Returns what was done;
    raises :class:`AttemptStillRunning` when a process survived all of that."""
    notes: list[str] = []
    deadline = time.monotonic() + grace
    pids = attempt_pids(client, tag)
    while pids and time.monotonic() < deadline:
        sleep(0.25)
        pids = attempt_pids(client, tag)
    for sig, wait in (("TERM", 10.0), ("KILL", 5.0)):
        if not pids:
            break
        client.run(("kill", f"-{sig}", *map(str, pids)), timeout=15, check=False)
        notes.append(f"sent SIG{sig} to the attempt's remote process(es) "
                     + ", ".join(map(str, pids)))
        end = time.monotonic() + wait
        while pids and time.monotonic() < end:
            sleep(0.25)
            pids = attempt_pids(client, tag)
    if pids:
        raise AttemptStillRunning(f"remote process(es) {', '.join(map(str, pids))} of "
                                  f"{tag} on {client.target.name} survived SIGKILL "
                                  "(stuck in the kernel, e.g. on a hung mount?)"
                                  + (f" after: {'; '.join(notes)}" if notes else ""))
    return notes


def remote_pid_alive(client: SshClient, pid: int) -> bool:
    """Does ``pid`` exist on the host? (``/proc`` works for any user; ``kill -0`` does
    not for other users' processes.)"""
    res = client.run(("test", "-d", f"/proc/{int(pid)}"), timeout=15, check=False)
    return res.returncode == 0


def remote_hostname(client: SshClient) -> str:
    """The name restic records in its locks on that host (``os.Hostname()``)."""
    return client.run(("uname", "-n"), timeout=15).stdout.strip()


# -- running restic on the host ----------------------------------------------------------------

@dataclass
class Remote:
    """restic on one host: the connection, the binary, the secrets for its stdin."""

    client: SshClient
    binary: str
    env: dict[str, str]
    sudo: bool | str = False
    """False, True (``sudo -n -- sh -c``) or ``"restic"`` (no shell under sudo)."""

    def run(self, argv: Sequence[str], *, timeout: float, with_env: bool = True,
            check: bool = True, **kwargs: Any) -> CommandResult:
        argv = tuple(argv)
        env = self.env if with_env else None
        if self.sudo == "restic":
            return self.client.run(sudo_restic(argv, sorted(env or {})), timeout=timeout,
                                   env=env, codes=restic.EXIT_CODES, check=check, **kwargs)
        if self.sudo:
            data = env_block(env or {})
            return self.client.run(sudo_wrap(argv), timeout=timeout, input=data,
                                   codes=restic.EXIT_CODES, check=check, **kwargs)
        return self.client.run(argv, timeout=timeout, env=env, codes=restic.EXIT_CODES,
                               check=check, **kwargs)

    def version(self) -> str:
        argv = version_argv(self.binary)
        if self.sudo:
            argv = ("sudo", "-n", "--", *argv)
        res = self.client.run(argv, timeout=30, check=False)
        return check_version(res, host=self.client.target.name, binary=self.binary)

    def unlock(self, repo: restic.Repo, *, timeout: float = 120) -> None:
        try:
            self.run(unlock_argv(self.binary, repo), timeout=timeout)
        except CommandError as exc:
            raise restic.classify_failure(exc) from None


def handle_locks(remote: Remote, repo: restic.Repo, *, wait: float, stale_after: float,
                 log: Log, timeout: float = 60,
                 sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """:func:`labkeeper.restic.wait_for_locks` for a backup that runs on another host:
    "is its process gone?" is asked on the host that took the lock, and ``restic
    unlock`` runs there (see the module docstring)."""
    host_name = remote_hostname(remote.client)
    notes: list[str] = []
    deadline = time.monotonic() + wait
    delay = 1.0
    waited: set[str] = set()

    def alive(pid: int) -> bool:
        return remote_pid_alive(remote.client, pid)

    while True:
        locks = restic.list_locks(repo, timeout=timeout)
        now = datetime.now(tz=UTC)
        stale, live = [], []
        for lock in locks:
            if lock.hostname == host_name:
                is_stale, why = restic.lock_is_stale(lock, now=now, this_host=host_name,
                                                     stale_after=stale_after, pid_alive=alive)
            else:  # another host's pid cannot be checked from here: age only
                is_stale, why = restic.lock_is_stale(lock, now=now, this_host=host_name,
                                                     stale_after=stale_after,
                                                     pid_alive=lambda _pid: True)
            (stale if is_stale else live).append((lock, why))
        if stale:
            remote.unlock(repo, timeout=timeout)
            remaining = {lk.id for lk in restic.list_locks(repo, timeout=timeout)}
            for lock, why in stale:
                if lock.id in remaining:
                    note = (f"stale {restic.describe_lock(lock)} ({why}) could not be removed "
                            f"by `restic unlock` on {remote.client.target.name}")
                    live.append((lock, why))
                else:
                    note = (f"removed stale {restic.describe_lock(lock)} with `restic unlock` "
                            f"on {remote.client.target.name}: {why}")
                notes.append(note)
                log(note)
        blocking = [(lk, why) for lk, why in live if lk.exclusive]
        if not blocking:
            return notes
        restic.note_blocking(blocking, deadline=deadline, wait=wait, waited=waited,
                             notes=notes, log=log)
        sleep(min(delay, max(0.1, deadline - time.monotonic())))
        delay = min(delay * 2, 30.0)


class PendingCleanups(pending_mod.PendingStore):
    """The pending-cleanup file of one path set (see :func:`pending_path` and
    :class:`labkeeper.pending.PendingStore`)."""

    def __init__(self, state_dir: Path, host: str, name: str) -> None:
        super().__init__(state_dir, pending_owner(host, name))
        self.host = host
        self.name = name


def discard_attempt(target: SshTarget, repo: restic.Repo, *, binary: str, env: dict[str, str],
                    sudo: bool | str, lab: str, backup_id: str, log: Log,
                    connector: Callable[[SshTarget], SshClient] = connect,
                    grace: float = STOP_GRACE,
                    pending: PendingCleanups | None = None) -> list[str]:
    """After a failed attempt: no restic of it still running on the host, its lock
    removed (on the host), every snapshot carrying its tag forgotten. Uses a fresh
    SSH connection (the old one may be what failed). When any of that could not be
    done the attempt is recorded in ``pending`` for the next backup to sweep
    (:func:`sweep_pending`). Returns what was done."""
    tag = backup_tag(backup_id)
    notes: list[str] = []
    problems: list[str] = []
    client: SshClient | None = None
    try:
        client = connector(target)
        notes += stop_attempt(client, tag, grace=grace)
        Remote(client, binary, env, sudo).unlock(repo, timeout=CLEANUP_TIMEOUT)
        notes.append(f"ran `restic unlock` on {target.name} (stale locks only)")
    except LabkeeperError as exc:
        problems.append(f"could not reach {target.name} to stop the attempt / unlock: {exc}")
        notes.append(problems[-1] + " (a restic of the attempt may still finish on the "
                     f"host and leave a snapshot tagged {tag})")
    finally:
        if client is not None:
            client.close()
    try:
        leftovers = restic.find_snapshots(repo, tags=[tag], host=lab, timeout=CLEANUP_TIMEOUT)
        if leftovers:
            restic.forget_ids(repo, [s.id for s in leftovers], timeout=CLEANUP_TIMEOUT)
            notes.append("forgot snapshot(s) " + ", ".join(s.short_id or s.id[:8]
                                                           for s in leftovers)
                         + f" of failed attempt {backup_id}")
        else:
            notes.append(f"no snapshot of attempt {backup_id} exists")
    except LabkeeperError as exc:
        problems.append(f"could not list/forget snapshots of attempt {backup_id}: {exc}")
        notes.append(problems[-1])
    if problems:
        notes.append(_record_pending(pending, backup_id, lab=lab, host=target.name,
                                     reason="; ".join(problems)))
    for n in notes:
        log(n)
    return notes


def _record_pending(pending: PendingCleanups | None, backup_id: str, *, lab: str, host: str,
                    reason: str) -> str:
    tag = backup_tag(backup_id)
    by_hand = (f"once no restic of it runs on {host} any more, forget its snapshots with "
               f"`restic forget --tag {tag}` (and `restic unlock` on {host})")
    if pending is None:
        return f"attempt {backup_id} is not cleaned up: {by_hand}"
    try:
        pending.add(new_pending(backup_id, snapshot_host=lab, reason=reason))
    except (OSError, LabkeeperError) as exc:
        return (f"attempt {backup_id} is not cleaned up and could not be recorded as pending "
                f"in {pending.path} ({exc}): {by_hand}")
    return (f"recorded attempt {backup_id} as pending cleanup in {pending.path}: the next "
            f"backup of {pending.name} first stops any restic of it on {host}, unlocks and "
            f"forgets every snapshot tagged {tag}")


def sweep_pending(remote: Remote, repo: restic.Repo, store: PendingCleanups, *, label: str,
                  grace: float, log: Log) -> tuple[list[str], list[PendingAttempt]]:
    """Finish the cleanup of every pending attempt of this path set, on the connection
    of the new backup: stop any restic of it on the host (:func:`stop_attempt`), run
    ``restic unlock`` there, forget every snapshot carrying its tag; an attempt leaves
    the pending file only when all three succeeded.

    Returns (what was done, the attempts still pending because the *repository* part
    failed: nothing of them runs any more, the backup may go on). Raises
    :class:`PathBackupFailed` when it cannot be made sure that no restic of an attempt
    still runs on the host: backing up beside a restic that may still add a snapshot
    to the series is not done (the attempt stays pending)."""
    attempts = store.read()
    host = remote.client.target.name
    notes: list[str] = []
    left: list[PendingAttempt] = []
    done: list[str] = []
    try:
        for attempt in attempts:
            tag = attempt.tag
            try:
                steps = stop_attempt(remote.client, tag, grace=grace) or [
                    f"no process of it runs on {host}"]
            except LabkeeperError as exc:
                log(f"{label}: cleanup of attempt {attempt.backup_id} failed on {host}: {exc}")
                raise PathBackupFailed(
                    f"backup of {label} not started: earlier failed attempt "
                    f"{attempt.backup_id} (pending cleanup since {attempt.since}) could not be "
                    f"cleaned up — it cannot be made sure that no restic of it still runs on "
                    f"{host} ({exc}); such a restic may still add a snapshot tagged {tag} "
                    f"to the series {series_label(store.host, store.name)}. It stays pending "
                    f"in {store.path} and is swept again before the next backup",
                    transient=exc.transient, path_set=label) from None
            problems: list[str] = []
            try:
                remote.unlock(repo, timeout=CLEANUP_TIMEOUT)
                steps.append(f"ran `restic unlock` on {host}")
            except LabkeeperError as exc:
                problems.append(f"`restic unlock` on {host} failed: {exc}")
            try:
                leftovers = restic.find_snapshots(repo, tags=[tag], host=attempt.snapshot_host,
                                                  timeout=CLEANUP_TIMEOUT)
                if leftovers:
                    restic.forget_ids(repo, [s.id for s in leftovers], timeout=CLEANUP_TIMEOUT)
                    steps.append("forgot snapshot(s) " + ", ".join(s.short_id or s.id[:8]
                                                                   for s in leftovers))
                else:
                    steps.append("no snapshot of it exists")
            except LabkeeperError as exc:
                problems.append(f"could not list/forget its snapshots: {exc}")
            if problems:
                left.append(attempt)
                note = (f"{label}: cleanup of earlier failed attempt {attempt.backup_id} "
                        f"(pending since {attempt.since}) is still incomplete: "
                        f"{'; '.join(problems)} (done: {'; '.join(steps)}); nothing of it "
                        f"runs any more, but a snapshot tagged {tag} may remain in the "
                        f"series; it stays pending in {store.path}")
            else:
                done.append(attempt.backup_id)
                note = (f"{label}: swept earlier failed attempt {attempt.backup_id} (pending "
                        f"cleanup since {attempt.since}): {'; '.join(steps)}")
            notes.append(note)
            log(note)
    finally:
        try:
            store.remove(done)
        except (OSError, LabkeeperError) as exc:  # swept again next time: harmless
            note = f"could not update the pending-cleanup file {store.path}: {exc}"
            notes.append(note)
            log(note)
    return notes, left


# -- where things are (inventory → resolved targets) -------------------------------------------

def select_path_sets(inv: Inventory, host: str | None = None,
                     names: Sequence[str] | None = None) -> list[str]:
    """Path set names to back up: ``names`` (default all), limited to ``host``."""
    chosen = list(names) if names else [pb.name for pb in inv.path_backups]
    for n in chosen:
        inv.path_backup(n)  # unknown names fail now, with a "did you mean"
    if host:
        targets = inv.ssh_targets()
        if host not in targets:
            inv.ssh_target(host)  # raises with a "did you mean"
        chosen = [n for n in chosen if inv.path_backup(n).host == host]
    if not chosen:
        raise ConfigError("no path set to back up"
                          + (f" on host {host}" if host else "")
                          + " (declare path_backups in the inventory)")
    return chosen


def open_repo(inv: Inventory, pb: PathBackup) -> restic.Repo:
    from labkeeper.pg_backup import open_repo as _open

    return _open(inv, inv.repository_for(pb).name)


def ssh_target_for(inv: Inventory, pb: PathBackup) -> SshTarget:
    return SshTarget.from_spec(inv.ssh_target(pb.host))


# -- one path set ----------------------------------------------------------------------------

def backup_path_set(inv: Inventory, name: str, *, log: Log = print,
                    progress: Log | None = None, warn: Log | None = None,
                    backup_id: str | None = None,
                    connector: Callable[[SshTarget], SshClient] = connect,
                    stop_grace: float = STOP_GRACE) -> PathBackupResult:
    """Back up one path set on its host (see the module docstring). Raises
    :class:`ResticMissing`, :class:`PathBackupFailed` or the SSH/lock errors."""
    pb = inv.path_backup(name)
    repo_cfg = inv.repository_for(pb)
    repo = open_repo(inv, pb)
    target = ssh_target_for(inv, pb)
    lab = inv.lab.name
    backup_id = backup_id or new_backup_id()
    tag = backup_tag(backup_id)
    label = f"{name}@{pb.host}"
    progress = progress or log
    warn = warn or log
    env = remote_env(host_repo(repo, pb.host_credentials),
                     progress_interval=pb.progress_interval)
    pending = PendingCleanups(inv.settings.state_dir, pb.host, name)
    waiting = pending.read()  # an unusable file fails here, before anything runs
    if waiting:
        log(f"{label}: {len(waiting)} earlier failed attempt(s) await cleanup: "
            + ", ".join(f"{a.backup_id} (since {a.since})" for a in waiting))
    started = time.monotonic()

    with contextlib.closing(connector(target)) as client:
        remote = Remote(client, pb.restic_binary, env, pb.sudo)
        version = remote.version()
        log(f"{label}: restic {version} on {pb.host}; backup {backup_id} of "
            f"{', '.join(map(str, pb.paths))} into {repo_cfg.name}")
        notes = handle_locks(remote, repo, wait=repo_cfg.lock_wait_minutes * 60,
                             stale_after=repo_cfg.stale_lock_minutes * 60, log=log)
        still_pending: list[PendingAttempt] = []
        if waiting:
            swept, still_pending = sweep_pending(remote, repo, pending, label=label,
                                                 grace=stop_grace, log=log)
            notes += swept

        def fail(message: str, *, transient: bool) -> PathBackupFailed:
            cleanup = discard_attempt(target, repo, binary=pb.restic_binary, env=env,
                                      sudo=pb.sudo, lab=lab, backup_id=backup_id, log=log,
                                      connector=connector, grace=stop_grace,
                                      pending=pending)
            return PathBackupFailed(f"backup of {label} failed: {message} "
                                    f"[{'; '.join(cleanup)}]", transient=transient,
                                    path_set=label, backup_id=backup_id)

        throttle = ProgressThrottle(pb.progress_interval)
        errors = ErrorCollector()
        summaries: list[SummaryMessage] = []

        def on_line(line: str) -> None:
            msg = parse_message(line)
            if isinstance(msg, StatusMessage):
                if throttle.offer(msg):
                    progress(format_progress(label, msg))
            elif isinstance(msg, SummaryMessage):
                summaries.append(msg)
            elif isinstance(msg, ErrorMessage):
                errors.add(msg)
            elif msg is None and (note := restic.backend_retry(line)) is not None:
                log(f"{label}: {note}")

        argv = backup_argv(pb, repo, lab=lab, tags=[*series_tags(pb.host, name), tag],
                           compression=repo_cfg.compression)
        t0 = time.monotonic()
        try:
            res = remote.run(argv, timeout=pb.timeout_minutes * 60, check=False,
                             on_stdout_line=on_line, on_stderr_line=on_line,
                             stdout_writer=_discard)
        except SSHConnectError as exc:
            raise fail(f"the SSH connection to {pb.host} was lost during the backup: {exc}",
                       transient=True) from None
        except LabkeeperError as exc:
            raise fail(str(exc), transient=exc.transient) from None
        restic_s = time.monotonic() - t0
        if res.returncode not in (0, 3):
            err = restic.classify_failure(_make_error(res))
            raise fail(str(err) + _stderr_hint(res), transient=err.transient) from None
        if not summaries:
            raise fail(f"restic exited {res.returncode} but printed no summary "
                       "(no snapshot was reported)", transient=False)
    summary = summaries[-1]
    if throttle.latest is not None and throttle.latest.percent_done < 1:
        progress(format_progress(label, throttle.latest.model_copy(
            update={"percent_done": 1.0, "bytes_done": summary.total_bytes_processed,
                    "total_bytes": summary.total_bytes_processed,
                    "files_done": summary.total_files_processed,
                    "total_files": summary.total_files_processed})))

    # Proof: exactly one snapshot of this attempt, the one restic named, with our paths.
    try:
        snaps = restic.find_snapshots(repo, tags=[tag], host=lab, timeout=120)
    except LabkeeperError as exc:
        raise fail(f"could not verify snapshot {summary.snapshot_id}: {exc}",
                   transient=exc.transient) from None
    if (len(snaps) != 1 or not snaps[0].id.startswith(summary.snapshot_id)
            or sorted(snaps[0].paths) != sorted(map(str, pb.paths))):
        found = ", ".join(f"{s.id[:8]} {s.paths}" for s in snaps) or "none"
        raise fail(f"snapshot {summary.snapshot_id} of attempt {backup_id} not found as "
                   f"expected (found {found})", transient=False)
    snapshot = snaps[0]

    status = "ok"
    unreadable = errors.paths()
    if res.returncode == 3 or errors.count:
        status = "warning"
        shown = "; ".join(u.short() for u in unreadable[:10])
        more = f" (and {errors.count - 10} more)" if errors.count > 10 else ""
        warning = (f"{label}: snapshot {snapshot.id[:8]} is INCOMPLETE: restic could not "
                   f"read {errors.count} path(s): {shown}{more}")
        notes.append(warning)
        warn(warning)
    if still_pending:
        status = "warning"
        warning = (f"{label}: {len(still_pending)} earlier failed attempt(s) still await "
                   "cleanup (" + ", ".join(a.backup_id for a in still_pending)
                   + f"): a snapshot of theirs may be counted in {series_label(pb.host, name)}"
                   f" until a later backup forgets it (or `restic forget --tag "
                   f"{still_pending[0].tag}`)")
        notes.append(warning)
        warn(warning)
    duration = time.monotonic() - started
    result = PathBackupResult(
        name=name, host=pb.host, backup_id=backup_id, status=status,
        snapshot_id=snapshot.id, restic_version=version,
        files=summary.total_files_processed, bytes_processed=summary.total_bytes_processed,
        data_added=summary.data_added, files_new=summary.files_new,
        files_changed=summary.files_changed, files_unmodified=summary.files_unmodified,
        duration_s=duration, restic_s=restic_s, unreadable_count=errors.count,
        unreadable=[{"path": u.path, "reason": u.reason, "during": u.during}
                    for u in unreadable],
        notes=notes, summary=summary.model_dump())
    log(f"{label}: snapshot {snapshot.id[:8]} ({summary.total_files_processed} files, "
        f"{human_bytes(summary.total_bytes_processed)}, {human_bytes(summary.data_added)} new "
        f"uncompressed) in {duration:.1f} s [{status}]")
    return result


def _discard(_data: bytes) -> None:
    """stdout is consumed line by line; nothing needs keeping (status lines add up)."""


def _make_error(res: CommandResult) -> CommandError:
    from labkeeper.process import make_error

    return make_error(res)


def _stderr_hint(res: CommandResult) -> str:
    text = " | ".join(ln for ln in res.stderr.splitlines()[-3:] if ln.strip())
    return f" (restic: {text})" if text else ""


# -- retention series (repo maintenance) ------------------------------------------------------

def retention_series(inv: Inventory, repo_name: str) -> list[Any]:
    """The series of every path set in a repository (``pg_backup.Series``), for
    ``forget`` with ``--group-by host`` after filtering by the stable tags."""
    from labkeeper.pg_backup import Series

    return [Series(series_label(pb.host, pb.name), inv.lab.name,
                   tuple(series_tags(pb.host, pb.name)))
            for pb in inv.path_backups if inv.repository_for(pb).name == repo_name]


def iter_unreadable_lines(result: PathBackupResult, width: int = 160) -> Iterator[str]:
    for u in result.unreadable:
        yield f"{shorten_path(u['path'], width)} — {u['reason']} ({u['during']})"
    if result.unreadable_count > len(result.unreadable):
        yield f"… and {result.unreadable_count - len(result.unreadable)} more"

