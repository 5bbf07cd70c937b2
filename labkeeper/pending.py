"""Failed backup attempts whose cleanup did not finish, remembered until a later backup
of the same series sweeps them (path sets and PostgreSQL databases alike).

A failed attempt's snapshots carry its unique ``backup:<id>`` tag. When forgetting
them fails (the repository is unreachable or locked at that moment), a snapshot of
the attempt may stay in the series, where retention and status would count it. The
attempt is then recorded in a small JSON file under ``settings.state_dir``, one file
per series owner (``<state_dir>/<directory>/pending-<part>[.<part>].json``; the parts
are inventory names, which can hold neither ``.`` nor ``/``). Every change is a
read-modify-write under an exclusive ``flock`` of the directory and lands with
``os.replace``; the file is removed when nothing is pending. It holds attempt ids,
times and redacted reasons only, no secret.

:class:`Owner` says whose file it is (written into the file and checked when it is
read, so a file copied or renamed by hand is refused rather than read as empty).
:func:`record` adds a failed attempt, :func:`sweep` finishes the cleanups before a
new backup (each kind of backup says how to clean one attempt up).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from labkeeper import restic
from labkeeper.errors import CommandError, LabkeeperError, PermanentError
from labkeeper.secrets import redact

logger = logging.getLogger(__name__)

PENDING_FORMAT = 1
_FILE_PART = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")


@dataclass(frozen=True)
class Owner:
    """Whose pending file: its directory under the state dir, the identity fields
    (``(json key, value, what it is)``, in file-name order) and the series label."""

    directory: str
    ident: tuple[tuple[str, str, str], ...]
    series: str

    @property
    def label(self) -> str:
        return "/".join(value for _key, value, _what in self.ident)


def pending_path(state_dir: Path, owner: Owner) -> Path:
    """``<state_dir>/<directory>/pending-<v1>[.<v2>].json``; refuses values that could
    leave the directory or collide with another owner's file."""
    for _key, value, what in owner.ident:
        if not _FILE_PART.fullmatch(value):
            raise ValueError(f"{what} {value!r} cannot name a state file")
    name = ".".join(value for _key, value, _what in owner.ident)
    return Path(state_dir) / owner.directory / f"pending-{name}.json"


@dataclass(frozen=True)
class PendingAttempt:
    """A failed attempt whose cleanup did not finish."""

    backup_id: str
    snapshot_host: str
    """restic's ``--host`` of its snapshots (the lab's name when it ran)."""
    since: str
    """When it was recorded (ISO 8601, UTC)."""
    reason: str = ""
    """Why the cleanup did not finish (redacted)."""

    @property
    def tag(self) -> str:
        return f"backup:{self.backup_id}"


def new_pending(backup_id: str, *, snapshot_host: str, reason: str,
                now: datetime | None = None) -> PendingAttempt:
    now = now or datetime.now(tz=UTC)
    return PendingAttempt(backup_id=backup_id, snapshot_host=snapshot_host,
                          since=now.isoformat(timespec="seconds"), reason=redact(reason)[:1000])


def dump_pending(owner: Owner, attempts: Sequence[PendingAttempt]) -> str:
    data: dict[str, object] = {"format": PENDING_FORMAT}
    data.update({key: value for key, value, _what in owner.ident})
    data["series"] = owner.series
    data["attempts"] = [asdict(a) for a in attempts]
    return json.dumps(data, indent=1) + "\n"


def _attempt(item: object) -> PendingAttempt:
    if not isinstance(item, dict):
        raise ValueError(f"attempt {item!r} is not an object")
    try:
        attempt = PendingAttempt(backup_id=str(item["backup_id"]),
                                 snapshot_host=str(item["snapshot_host"]),
                                 since=str(item.get("since", "")),
                                 reason=str(item.get("reason", "")))
    except KeyError as exc:
        raise ValueError(f"attempt {item!r} has no {exc.args[0]}") from None
    if not attempt.backup_id or not attempt.snapshot_host:
        raise ValueError(f"attempt {item!r} has an empty id or host")
    restic.check_tag(attempt.tag)
    return attempt


def load_pending(text: str, owner: Owner) -> list[PendingAttempt]:
    """The attempts in ``owner``'s pending file; ValueError when the text is not such a
    file (any other JSON, another owner's, an id restic could not match)."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != PENDING_FORMAT:
        raise ValueError(f"not a pending-cleanup file of format {PENDING_FORMAT}")
    found = tuple(data.get(key) for key, _value, _what in owner.ident)
    if found != tuple(value for _key, value, _what in owner.ident):
        raise ValueError(f"it belongs to {'/'.join(map(str, found))}, not {owner.label}")
    attempts = data.get("attempts")
    if not isinstance(attempts, list):
        raise ValueError("no list of attempts")
    return [_attempt(item) for item in attempts]


def with_pending(attempts: Sequence[PendingAttempt], new: PendingAttempt
                 ) -> list[PendingAttempt]:
    """``attempts`` plus ``new`` (an attempt recorded twice keeps its first record)."""
    if any(a.backup_id == new.backup_id for a in attempts):
        return list(attempts)
    return [*attempts, new]


def without_pending(attempts: Sequence[PendingAttempt], ids: Sequence[str]
                    ) -> list[PendingAttempt]:
    gone = set(ids)
    return [a for a in attempts if a.backup_id not in gone]


class PendingStore:
    """One owner's pending-cleanup file (see the module docstring)."""

    def __init__(self, state_dir: Path, owner: Owner) -> None:
        self.owner = owner
        self.path = pending_path(state_dir, owner)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> list[PendingAttempt]:
        """The pending attempts; a file that cannot be read or understood is a
        :class:`PermanentError` (guessing "nothing pending" could hide a snapshot)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise PermanentError(f"cannot read the pending-cleanup file {self.path}: "
                                 f"{exc}") from None
        try:
            return load_pending(text, self.owner)
        except ValueError as exc:
            series = self.owner.series
            raise PermanentError(
                f"the pending-cleanup file {self.path} is not usable ({exc}); attempts it "
                f"listed may have left snapshots in the series {series}: look at `restic "
                f"snapshots --tag {series}`, forget those of failed attempts (their "
                "backup:<id> tag is not in a successful run), then remove the file"
            ) from None

    def _write(self, attempts: Sequence[PendingAttempt]) -> None:
        if not attempts:
            self.path.unlink(missing_ok=True)
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(dump_pending(self.owner, attempts))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add(self, attempt: PendingAttempt) -> None:
        with self._locked():
            self._write(with_pending(self.read(), attempt))

    def remove(self, ids: Sequence[str]) -> None:
        if not ids or not self.path.exists():
            return
        with self._locked():
            self._write(without_pending(self.read(), ids))


def record(store: PendingStore | None, backup_id: str, *, snapshot_host: str, reason: str,
           by_hand: str, next_backup: str) -> str:
    """Remember a failed attempt whose cleanup did not finish; returns the note saying
    so (``next_backup``: what the next backup does about it), or how to clean it up
    ``by_hand`` when there is no store or even recording it failed."""
    if store is None:
        return f"attempt {backup_id} is not cleaned up: {by_hand}"
    try:
        store.add(new_pending(backup_id, snapshot_host=snapshot_host, reason=reason))
    except (OSError, LabkeeperError) as exc:
        return (f"attempt {backup_id} is not cleaned up and could not be recorded as pending "
                f"in {store.path} ({exc}): {by_hand}")
    return f"recorded attempt {backup_id} as pending cleanup in {store.path}: {next_backup}"


STALE_LOCK_AFTER = 2 * 3600.0
"""A lock older than this is stale whoever holds it (one of a dead process on this
machine is stale at once)."""


def forget_attempt(repo: restic.Repo, backup_id: str, *, host: str, timeout: float
                   ) -> tuple[bool, str]:
    """Forget every snapshot of ``host`` tagged with a failed attempt's ``backup:<id>``:
    (done, the note saying what happened or why it could not be done).

    The attempt's own restic, killed with its job, leaves a lock that blocks the
    forget: a lock refused is retried once after the stale locks are removed."""
    tag, removed = f"backup:{backup_id}", list[str]()
    try:
        try:
            leftovers = restic.forget_tagged(repo, tag, host=host, timeout=timeout)
        except CommandError as exc:
            if exc.meaning != restic.LOCK_FAILED:
                raise
            restic.remove_stale(repo, restic.local_site(repo, timeout=timeout),
                                stale_after=STALE_LOCK_AFTER, notes=removed, timeout=timeout)
            if not removed:
                raise
            leftovers = restic.forget_tagged(repo, tag, host=host, timeout=timeout)
    except LabkeeperError as exc:
        return False, f"could not list/forget snapshots of attempt {backup_id}: {exc}"
    if not leftovers:
        return True, f"no snapshot of attempt {backup_id} exists"
    return True, ("forgot snapshot(s) " + ", ".join(s.short_id or s.id[:8] for s in leftovers)
                  + f" of failed attempt {backup_id}" + "".join(f" ({n})" for n in removed))


Clean = Callable[[PendingAttempt], tuple[bool, str]]
"""Finishes one pending attempt's cleanup: (all done, the note saying what happened).
It may raise to stop the sweep; the attempts done so far still leave the file."""


def sweep(store: PendingStore, clean: Clean) -> tuple[list[str], list[PendingAttempt]]:
    """Run ``clean`` on every pending attempt of ``store`` (each note logged); an
    attempt leaves the file only when its cleanup was all done. Returns (the notes,
    the attempts still pending). Failing to update the file is a note, not an error:
    the attempt is swept again next time, which is harmless."""
    notes: list[str] = []
    left: list[PendingAttempt] = []
    done: list[str] = []
    try:
        for attempt in store.read():
            ok, note = clean(attempt)
            if ok:
                done.append(attempt.backup_id)
            else:
                left.append(attempt)
            notes.append(note)
            logger.info("%s", note)
    finally:
        try:
            store.remove(done)
        except (OSError, LabkeeperError) as exc:
            notes.append(f"could not update the pending-cleanup file {store.path}: {exc}")
            logger.info("%s", notes[-1])
    return notes, left
