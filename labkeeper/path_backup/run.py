"""One path set's backup (:func:`backup_path_set`), run by restic on the host that
holds the files, over SSH:

1. restic's version on the host (missing or too old: :class:`ResticMissing`);
2. locks: stale ones removed on that host, live exclusive ones waited for
   (:func:`handle_locks`); earlier failed attempts swept (:func:`sweep_pending`);
3. ``restic backup --json`` with the series tags and the attempt's ``backup:<id>``
   tag; progress logged every ``progress_interval`` seconds; exit 3 (some source
   unreadable) is a *warning* naming the paths, any other failure fails;
4. proof: exactly one snapshot carries the attempt's tag, the one restic named,
   holding exactly the configured paths;
5. on any failure nothing of the attempt survives (:func:`discard_attempt`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from labkeeper import restic
from labkeeper.errors import ConfigError, LabkeeperError, SSHConnectError
from labkeeper.inventory import Inventory, PathBackup
from labkeeper.path_backup.cleanup import PendingCleanups, discard_attempt, sweep_pending
from labkeeper.path_backup.progress import (
    ErrorCollector,
    ProgressThrottle,
    format_progress,
    human_bytes,
)
from labkeeper.path_backup.remote import (
    STOP_GRACE,
    Remote,
    backup_argv,
    handle_locks,
    host_repo,
    remote_env,
)
from labkeeper.path_backup.results import (
    PathBackupFailed,
    PathBackupResult,
    backup_tag,
    new_backup_id,
    series_label,
    series_tags,
)
from labkeeper.pending import PendingAttempt
from labkeeper.process import CommandResult, make_error
from labkeeper.ssh import SshClient, SshTarget, connect

logger = logging.getLogger(__name__)


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
    return restic.open_repo(inv, inv.repository_for(pb).name)


def ssh_target_for(inv: Inventory, pb: PathBackup) -> SshTarget:
    return SshTarget.from_spec(inv.ssh_target(pb.host))


# -- one path set ----------------------------------------------------------------------------

@dataclass
class _Attempt:
    """One attempt at backing up a path set: what its steps share."""

    pb: PathBackup
    repo_cfg: Any
    repo: restic.Repo
    target: SshTarget
    lab: str
    backup_id: str
    env: dict[str, str]
    pending: PendingCleanups
    connector: Callable[[SshTarget], SshClient]
    stop_grace: float

    @property
    def name(self) -> str:
        return self.pb.name

    @property
    def tag(self) -> str:
        return backup_tag(self.backup_id)

    @property
    def label(self) -> str:
        return f"{self.pb.name}@{self.pb.host}"

    def fail(self, message: str, *, transient: bool) -> PathBackupFailed:
        """Discard everything of this attempt; the error to raise, saying what was done."""
        cleanup = discard_attempt(self.target, self.repo, binary=self.pb.restic_binary,
                                  env=self.env, sudo=self.pb.sudo, lab=self.lab,
                                  backup_id=self.backup_id,
                                  connector=self.connector, grace=self.stop_grace,
                                  pending=self.pending)
        return PathBackupFailed(f"backup of {self.label} failed: {message} "
                                f"[{'; '.join(cleanup)}]", transient=transient,
                                path_set=self.label, backup_id=self.backup_id)


class _Output:
    """restic's ``--json`` lines (stdout and stderr) as they come: progress logged every
    ``progress_interval`` seconds, summaries and unreadable paths kept, backend
    retries written to the run log."""

    def __init__(self, att: _Attempt) -> None:
        self.att = att
        self.throttle = ProgressThrottle(att.pb.progress_interval)
        self.errors = ErrorCollector()
        self.summaries: list[restic.SummaryMessage] = []

    def __call__(self, line: str) -> None:
        msg = restic.parse_message(line)
        if isinstance(msg, restic.StatusMessage):
            if self.throttle.offer(msg):
                logger.info("%s", format_progress(self.att.label, msg))
        elif isinstance(msg, restic.SummaryMessage):
            self.summaries.append(msg)
        elif isinstance(msg, restic.ErrorMessage):
            self.errors.add(msg)
        elif msg is None and (note := restic.backend_retry(line)) is not None:
            logger.info("%s: %s", self.att.label, note)

    def final_progress(self, summary: restic.SummaryMessage) -> None:
        """The last progress line at 100 %, when the throttle held it back."""
        latest = self.throttle.latest
        if latest is not None and latest.percent_done < 1:
            logger.info("%s", format_progress(self.att.label, latest.model_copy(
                update={"percent_done": 1.0, "bytes_done": summary.total_bytes_processed,
                        "total_bytes": summary.total_bytes_processed,
                        "files_done": summary.total_files_processed,
                        "total_files": summary.total_files_processed})))


def backup_path_set(inv: Inventory, name: str, *, backup_id: str | None = None,
                    connector: Callable[[SshTarget], SshClient] = connect,
                    stop_grace: float = STOP_GRACE) -> PathBackupResult:
    """Back up one path set on its host (see the module docstring). Raises
    :class:`ResticMissing`, :class:`PathBackupFailed` or the SSH/lock errors."""
    pb = inv.path_backup(name)
    repo_cfg = inv.repository_for(pb)
    repo = open_repo(inv, pb)
    att = _Attempt(pb=pb, repo_cfg=repo_cfg, repo=repo, target=ssh_target_for(inv, pb),
                   lab=inv.lab.name, backup_id=backup_id or new_backup_id(),
                   env=remote_env(host_repo(repo, pb.host_credentials),
                                  progress_interval=pb.progress_interval),
                   pending=PendingCleanups(inv.settings.state_dir, pb.host, name),
                   connector=connector, stop_grace=stop_grace)
    waiting = att.pending.read()  # an unusable file fails here, before anything runs
    if waiting:
        logger.info("%s: %d earlier failed attempt(s) await cleanup: %s", att.label,
                    len(waiting), ", ".join(f"{a.backup_id} (since {a.since})" for a in waiting))
    started = time.monotonic()
    with contextlib.closing(connector(att.target)) as client:
        remote = Remote(client, pb.restic_binary, att.env, pb.sudo)
        version = remote.version()
        logger.info("%s: restic %s on %s; backup %s of %s into %s", att.label, version,
                    pb.host, att.backup_id, ", ".join(map(str, pb.paths)), repo_cfg.name)
        notes = handle_locks(remote, repo, wait=repo_cfg.lock_wait_minutes * 60,
                             stale_after=repo_cfg.stale_lock_minutes * 60)
        still_pending: list[PendingAttempt] = []
        if waiting:
            swept, still_pending = sweep_pending(remote, repo, att.pending, label=att.label,
                                                 grace=stop_grace)
            notes += swept
        res, out, restic_s = _run_backup(att, remote)
    summary = out.summaries[-1]
    out.final_progress(summary)
    snapshot = _proven_snapshot(att, summary)
    status = _warnings(att, res, out.errors, snapshot, still_pending, notes)
    result = _result(att, version=version, summary=summary, snapshot=snapshot, status=status,
                     errors=out.errors, notes=notes,
                     duration=time.monotonic() - started, restic_s=restic_s)
    logger.info("%s: snapshot %s (%d files, %s, %s new uncompressed) in %.1f s [%s]",
                att.label, snapshot.id[:8], summary.total_files_processed,
                human_bytes(summary.total_bytes_processed), human_bytes(summary.data_added),
                result.duration_s, status)
    return result


def _run_backup(att: _Attempt, remote: Remote) -> tuple[CommandResult, _Output, float]:
    """``restic backup`` on the host: (its result, its output, its seconds)."""
    out = _Output(att)
    argv = backup_argv(att.pb, att.repo, lab=att.lab,
                       tags=[*series_tags(att.pb.host, att.name), att.tag],
                       compression=att.repo_cfg.compression)
    t0 = time.monotonic()
    try:
        res = remote.run(argv, timeout=att.pb.timeout_minutes * 60, check=False,
                         on_stdout_line=out, on_stderr_line=out, stdout_writer=_discard)
    except SSHConnectError as exc:
        raise att.fail(f"the SSH connection to {att.pb.host} was lost during the backup: "
                       f"{exc}", transient=True) from None
    except LabkeeperError as exc:
        raise att.fail(str(exc), transient=exc.transient) from None
    restic_s = time.monotonic() - t0
    if res.returncode not in (0, 3):
        err = restic.classify_failure(make_error(res))
        raise att.fail(str(err) + _stderr_hint(res), transient=err.transient) from None
    if not out.summaries:
        raise att.fail(f"restic exited {res.returncode} but printed no summary "
                       "(no snapshot was reported)", transient=False)
    return res, out, restic_s


def _proven_snapshot(att: _Attempt, summary: restic.SummaryMessage) -> restic.Snapshot:
    """Exactly one snapshot of this attempt, the one restic named, with our paths."""
    try:
        snaps = restic.find_snapshots(att.repo, tags=[att.tag], host=att.lab, timeout=120)
    except LabkeeperError as exc:
        raise att.fail(f"could not verify snapshot {summary.snapshot_id}: {exc}",
                       transient=exc.transient) from None
    if (len(snaps) != 1 or not snaps[0].id.startswith(summary.snapshot_id)
            or sorted(snaps[0].paths) != sorted(map(str, att.pb.paths))):
        found = ", ".join(f"{s.id[:8]} {s.paths}" for s in snaps) or "none"
        raise att.fail(f"snapshot {summary.snapshot_id} of attempt {att.backup_id} not found "
                       f"as expected (found {found})", transient=False)
    return snaps[0]


def _warnings(att: _Attempt, res: CommandResult, errors: ErrorCollector,
              snapshot: restic.Snapshot, still_pending: list[PendingAttempt],
              notes: list[str]) -> str:
    """The run's status (``ok`` | ``warning``); each warning added to ``notes``."""
    status = "ok"
    if res.returncode == 3 or errors.count:
        status = "warning"
        shown = "; ".join(u.short() for u in errors.paths()[:10])
        more = f" (and {errors.count - 10} more)" if errors.count > 10 else ""
        notes.append(f"{att.label}: snapshot {snapshot.id[:8]} is INCOMPLETE: restic could "
                     f"not read {errors.count} path(s): {shown}{more}")
        logger.warning("%s", notes[-1])
    if still_pending:
        status = "warning"
        notes.append(f"{att.label}: {len(still_pending)} earlier failed attempt(s) still "
                     "await cleanup (" + ", ".join(a.backup_id for a in still_pending)
                     + f"): a snapshot of theirs may be counted in "
                     f"{series_label(att.pb.host, att.name)} until a later backup forgets "
                     f"it (or `restic forget --tag {still_pending[0].tag}`)")
        logger.warning("%s", notes[-1])
    return status


def _result(att: _Attempt, *, version: str, summary: restic.SummaryMessage,
            snapshot: restic.Snapshot, status: str, errors: ErrorCollector,
            notes: list[str], duration: float, restic_s: float) -> PathBackupResult:
    return PathBackupResult(
        name=att.name, host=att.pb.host, backup_id=att.backup_id, status=status,
        snapshot_id=snapshot.id, restic_version=version,
        files=summary.total_files_processed, bytes_processed=summary.total_bytes_processed,
        data_added=summary.data_added, files_new=summary.files_new,
        files_changed=summary.files_changed, files_unmodified=summary.files_unmodified,
        duration_s=duration, restic_s=restic_s, unreadable_count=errors.count,
        unreadable=[{"path": u.path, "reason": u.reason, "during": u.during}
                    for u in errors.paths()],
        notes=notes, summary=summary.model_dump())


def _discard(_data: bytes) -> None:
    """stdout is consumed line by line; nothing needs keeping (status lines add up)."""


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
