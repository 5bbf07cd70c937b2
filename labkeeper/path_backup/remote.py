"""restic on the host that holds the files, driven over SSH: its argv and its
environment (secrets on the channel's stdin, never in the remote argv; under sudo two
ways, :func:`sudo_wrap` and :func:`sudo_restic`), its version, its locks (stale ones
removed *on that host*, where restic can tell its processes are gone), and the
processes of one attempt (found by its unique ``backup:<id>`` argument, stopped).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from labkeeper import restic
from labkeeper.errors import CommandError, ConfigError
from labkeeper.inventory import PathBackup
from labkeeper.path_backup.results import AttemptStillRunning, ResticMissing
from labkeeper.process import CommandResult
from labkeeper.secrets import redact
from labkeeper.ssh import ENV_PREAMBLE, SshClient, env_block

MIN_RESTIC = (0, 14, 0)
"""JSON error messages, ``--compression`` and repository format 2 need restic 0.14."""

INSTALL_HINT = (
    "install it on the host: `apt-get install restic` (Debian/Ubuntu, restic >= 0.14: "
    "Debian 12 or later), `dnf install restic`, `apk add restic`, or the static binary "
    "from https://github.com/restic/restic/releases (then `restic self-update`); or set "
    "path_backups[].restic_binary to its full path"
)
STOP_GRACE = 10.0
"""Seconds a restic whose SSH session died gets to notice (SIGPIPE) before SIGTERM."""


def backup_argv(pb: PathBackup, repo: restic.Repo, *, lab: str, tags: Sequence[str],
                compression: str | None = "auto") -> tuple[str, ...]:
    """``restic backup --json`` of one path set, run by its host's restic
    (:func:`labkeeper.restic.backup_paths_argv`)."""
    return restic.backup_paths_argv(
        repo, paths=pb.paths, host=lab, tags=tags, excludes=pb.excludes,
        exclude_caches=pb.exclude_caches, one_file_system=pb.one_file_system,
        compression=compression, binary=pb.restic_binary)


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
        argv = restic.version_argv(self.binary)
        if self.sudo:
            argv = ("sudo", "-n", "--", *argv)
        res = self.client.run(argv, timeout=30, check=False)
        return check_version(res, host=self.client.target.name, binary=self.binary)

    def unlock(self, repo: restic.Repo, *, timeout: float = 120) -> None:
        try:
            self.run(restic.unlock_argv(repo, binary=self.binary), timeout=timeout)
        except CommandError as exc:
            raise restic.classify_failure(exc) from None



def handle_locks(remote: Remote, repo: restic.Repo, *, wait: float, stale_after: float,
                 timeout: float = 60, sleep: Callable[[float], None] = time.sleep) -> list[str]:
    """:func:`labkeeper.restic.wait_for_locks` for a backup that runs on another host:
    "is its process gone?" is asked on the host that took the lock, and ``restic
    unlock`` runs there. Only exclusive locks (forget/prune/check) block a backup."""
    site = restic.LockSite(
        remote_hostname(remote.client), lambda pid: remote_pid_alive(remote.client, pid),
        lambda: remote.unlock(repo, timeout=timeout), where=f" on {remote.client.target.name}")
    return restic.settle_locks(repo, site, exclusive=False, wait=wait,
                               stale_after=stale_after, timeout=timeout, sleep=sleep)
