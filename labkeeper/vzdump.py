"""Guest backups with Proxmox's vzdump: selection, plan, verification, retention, native jobs.

No Prefect here. Pure functions decide (which guests, in which order, is this
archive good, what retention would remove, what native job to create); a few
thin functions act through :mod:`labkeeper.proxmox` (the one adapter):

* :func:`resolve_selection` — a job's :class:`~labkeeper.inventory.Selection`
  against ``/cluster/resources`` *at run time* (a guest tagged yesterday is in);
* :func:`node_queues` — per-node queues (the flow runs at most ``max_per_node``
  vzdumps per node at a time, nodes in parallel);
* :class:`NodeSlot` — one of a node's ``max_per_node`` slots, held only while
  the PVE task runs (checks before it and verification after it run outside,
  so a node's next vzdump starts the moment the previous one ends);
* :func:`backup_guest` — one guest: lock check, adopt a vzdump already running
  for it (a rerun after a crash), start ``vzdump`` (``remove=0``: nothing is
  pruned before the new archive is verified), wait with
  :func:`labkeeper.proxmox.wait_for_task`, parse the log, find and
  :func:`verify_archive` the new archive;
* :func:`apply_retention` — Proxmox's own prune semantics via ``prunebackups``
  for one guest, with a dry run; protected backups are never removed;
* :func:`plan_native_jobs` / :func:`apply_native_plan` — mirror jobs marked
  ``native: true`` as ``/cluster/backup`` jobs.

A guest counts as backed up only when vzdump said ``OK`` (or ``WARNINGS: n``:
success with warnings) *and* the new archive is in the storage content with the
right vmid, a plausible size, the expected format and the notes.
"""

from __future__ import annotations

import contextlib
import math
import posixpath
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from labkeeper import proxmox as px
from labkeeper.errors import LabkeeperError, PermanentError, ServiceError, TaskTimeout
from labkeeper.inventory import Inventory, PruneRetention, Selection, VzdumpJob
from labkeeper.secrets import redact

Status = Literal["ok", "warning", "failed", "locked", "skipped"]

NATIVE_PREFIX = "labkeeper-"
NATIVE_COMMENT = "managed by labkeeper (labkeeper vzdump sync-jobs)"


# ====================================================================== errors


class VerificationFailed(PermanentError):
    """vzdump said OK but the archive does not look like a good backup."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class VzdumpTimedOut(PermanentError):
    """The vzdump task ran past the job's timeout and was stopped (not retried:
    a second attempt would wait just as long)."""


# ====================================================================== selection


@dataclass(frozen=True)
class Target:
    """One guest to back up, as ``/cluster/resources`` showed it at selection time."""

    vmid: int
    node: str
    type: px.GuestType
    name: str = ""
    lock: str | None = None

    @property
    def label(self) -> str:
        return f"{self.vmid} ({self.name})" if self.name else str(self.vmid)


@dataclass(frozen=True)
class Resolved:
    targets: tuple[Target, ...]
    missing: tuple[int, ...] = ()
    """Explicitly selected vmids the cluster does not have (reported as failures)."""
    warnings: tuple[str, ...] = ()


def resolve_selection(selection: Selection, cluster: Iterable[px.Guest],
                      inventory_vmids: Mapping[str, int] | None = None) -> Resolved:
    """Which guests ``selection`` covers in ``cluster`` (pure).

    ``all``, or the union of ``vmids``, ``guests`` (inventory names → vmids),
    ``tags`` (any of) and ``pool``; limited to ``node``; minus ``exclude`` and
    ``exclude_tags``. With only ``node`` set: every guest on that node.
    """
    guests = {g.vmid: g for g in cluster}
    names = dict(inventory_vmids or {})
    explicit: list[int] = list(selection.vmids)
    warnings: list[str] = []
    for name in selection.guests:
        if name in names:
            explicit.append(names[name])
        else:
            warnings.append(f"guest {name!r} is not in the inventory")
    picked_anything = bool(selection.vmids or selection.guests or selection.tags
                           or selection.pool)
    chosen: set[int] = set()
    if selection.all or not picked_anything:
        chosen = set(guests)
    else:
        chosen.update(v for v in explicit if v in guests)
        if selection.tags:
            chosen.update(g.vmid for g in guests.values() if set(selection.tags) & set(g.tags))
        if selection.pool:
            chosen.update(g.vmid for g in guests.values() if g.pool == selection.pool)
    excluded = set(selection.exclude)
    if selection.exclude_tags:
        excluded.update(g.vmid for g in guests.values()
                        if set(selection.exclude_tags) & set(g.tags))
    if selection.node:
        chosen = {v for v in chosen if guests[v].node == selection.node}
    chosen -= excluded
    missing = sorted({v for v in explicit if v not in guests and v not in excluded})
    targets = tuple(Target(v, guests[v].node, guests[v].type, guests[v].name, guests[v].lock)
                    for v in sorted(chosen))
    if not targets and not missing:
        warnings.append("the selection matched no guest in the cluster")
    for vmid in missing:
        warnings.append(f"vmid {vmid} is selected but not in the cluster")
    return Resolved(targets, tuple(missing), tuple(warnings))


def inventory_vmids(inv: Inventory) -> dict[str, int]:
    return {g.name: g.vmid for g in inv.guests}


def resolve(api: Any, inv: Inventory, job: VzdumpJob) -> Resolved:
    """Resolve ``job``'s selection against the cluster now (one API call)."""
    return resolve_selection(job.selection, px.list_guests(api), inventory_vmids(inv))


# ====================================================================== plan


def node_queues(targets: Iterable[Target]) -> dict[str, list[Target]]:
    """Per-node queues in vmid order (nodes sorted by name)."""
    out: dict[str, list[Target]] = {}
    for t in sorted(targets, key=lambda t: (t.node, t.vmid)):
        out.setdefault(t.node, []).append(t)
    return out


def ideal_makespan(targets: Iterable[Target], duration: float, max_per_node: int = 1) -> float:
    """The schedule's lower bound: the busiest node's ``ceil(n / max_per_node) * duration``."""
    queues = node_queues(targets)
    if not queues:
        return 0.0
    return max(math.ceil(len(q) / max_per_node) for q in queues.values()) * duration


def timeout_seconds(job: VzdumpJob) -> float:
    return float(job.timeout_minutes) * 60


POLL_FRACTION = 0.03
POLL_FLOOR = 0.03


def proportional_sleep(*, fraction: float = POLL_FRACTION, floor: float = POLL_FLOOR,
                       clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], None] = time.sleep) -> Callable[[float], None]:
    """A ``sleep`` for :func:`labkeeper.proxmox.wait_for_task`: between two status polls
    wait at most ``fraction`` of the time the task has been watched so far (and at
    least ``floor``); the adapter's backoff, capped by ``poll_max``, still bounds it
    from above. A task that runs T seconds is noticed within about ``fraction * T``
    of its end — a node's next vzdump then starts without a poll interval's delay,
    while a long backup is polled no more often than the cap allows."""
    started = clock()

    def _sleep(delay: float) -> None:
        sleep(max(0.0, min(delay, max(floor, fraction * (clock() - started)))))

    return _sleep


class NodeSlot:
    """A claim on one of a node's vzdump slots (``threading.Semaphore(max_per_node)``),
    for one guest. :func:`backup_guest` holds it (``with slot:``) only from starting
    the vzdump (or adopting a running one) until the PVE task has ended — the
    node's next guest can start while this one is verified, pruned and copied.

    ``handoff`` is set once the slot was taken (or :meth:`give_up` is called when
    the guest ends without needing it): the node's feeder then prepares the next
    guest, which waits here for the slot. Entering again (a retried attempt)
    waits for a slot again, so the limit holds for retries too.
    """

    def __init__(self, node: str, slots: threading.Semaphore, *,
                 wait_timeout: float | None = None) -> None:
        self.node = node
        self.slots = slots
        self.wait_timeout = wait_timeout
        self.handoff = threading.Event()

    def __enter__(self) -> NodeSlot:
        if not self.slots.acquire(timeout=self.wait_timeout):
            self.handoff.set()
            raise TaskTimeout(f"no vzdump slot free on node {self.node} after "
                              f"{self.wait_timeout:g}s")
        self.handoff.set()
        return self

    def __exit__(self, *exc: object) -> None:
        self.slots.release()

    def give_up(self) -> None:
        """This guest will not take the slot (locked, already done, failed early)."""
        self.handoff.set()

    def __repr__(self) -> str:  # shown in Prefect's task parameters
        return f"NodeSlot({self.node})"


# ====================================================================== names, notes, formats


_COMPRESS_EXT = {"zstd": ".zst", "gzip": ".gz", "lzo": ".lzo", "0": ""}
_BASE_FORMAT = {"lxc": "tar", "qemu": "vma"}


def expected_format(gtype: str, compress: str) -> str:
    """The storage content ``format`` of a new archive: ``tar.zst``, ``vma.gz``, ``tar``…"""
    return _BASE_FORMAT[gtype] + _COMPRESS_EXT[compress]


def render_notes(template: str, *, guestname: str, vmid: int, node: str,
                 cluster: str | None = None) -> str:
    """PVE's notes-template rendering (``{{guestname}}``, ``{{vmid}}``, ``{{node}}``,
    ``{{cluster}}``; ``\\n`` becomes a newline). An unknown cluster name stays as is."""
    values = {"guestname": guestname, "vmid": str(vmid), "node": node}
    if cluster is not None:
        values["cluster"] = cluster
    out = template
    for key, value in values.items():
        out = re.sub(r"\{\{\s*" + key + r"\s*\}\}", lambda _m, v=value: v, out)
    return out.replace("\\n", "\n")


def notes_match(template: str, notes: str, *, guestname: str, vmid: int, node: str) -> bool:
    """Do the archive's notes match the rendered template (``{{cluster}}`` = anything)?"""
    rendered = render_notes(template, guestname=guestname, vmid=vmid, node=node)
    parts = re.split(r"\{\{\s*cluster\s*\}\}", rendered)
    pattern = ".+?".join(re.escape(p) for p in parts)
    return re.fullmatch(pattern, notes or "", flags=re.S) is not None


_ARCHIVE_NAME = re.compile(
    r"^vzdump-(?P<type>lxc|qemu|openvz)-(?P<vmid>\d+)-"
    r"(?P<stamp>\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2})\.(?P<ext>[\w.]+)$")


def archive_filename(volid: str) -> str:
    """``local:backup/vzdump-lxc-101-2025_01_01-01_00_00.tar.zst`` → the file name."""
    return posixpath.basename(volid.partition(":")[2])


def archive_time(filename: str) -> int | None:
    """The start time encoded in an archive name (local time of the node, as epoch)."""
    m = _ARCHIVE_NAME.match(filename)
    if not m:
        return None
    return int(datetime.strptime(m.group("stamp"), "%Y_%m_%d-%H_%M_%S").timestamp())


# ====================================================================== task log


@dataclass(frozen=True)
class VzdumpLog:
    """What a vzdump task log says (PVE/VZDump.pm wording)."""

    archive_path: str | None = None
    archive_size: str | None = None
    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    finished_ok: bool = False
    skipped_external: tuple[int, ...] = ()


_CREATING = re.compile(r"creating (?:vzdump |Proxmox Backup Server )?archive '([^']+)'")


def parse_log(lines: Iterable[str]) -> VzdumpLog:
    """Read the archive path, its size, errors and warnings from a vzdump log."""
    path = size = None
    errors: list[str] = []
    warnings: list[str] = []
    finished = False
    external: list[int] = []
    for raw in lines:
        line = raw.rstrip()
        body = line[len("INFO: "):] if line.startswith("INFO: ") else line
        if (m := _CREATING.search(body)) is not None:
            path = m.group(1)
        elif body.startswith("archive file size: "):
            size = body[len("archive file size: "):].strip()
        elif line.startswith("ERROR: "):
            errors.append(line[len("ERROR: "):])
        elif line.startswith("WARN: ") or line.startswith("WARNING: "):
            warnings.append(line.split(": ", 1)[1])
        elif body == "Backup job finished successfully":
            finished = True
        elif body.startswith("skip external VMs: "):
            external = [int(v) for v in re.findall(r"\d+", body)]
    return VzdumpLog(path, size, tuple(errors), tuple(warnings), finished, tuple(external))


# ====================================================================== verification


def pick_new_archive(before: Iterable[str], after: Iterable[px.StorageVolume], vmid: int,
                     log_path: str | None = None) -> px.StorageVolume | None:
    """The archive this backup created: named in the log if possible, else the newest
    volume of ``vmid`` that was not there before."""
    known = set(before)
    fresh = [v for v in after if v.volid not in known and (v.vmid in (None, vmid))]
    if log_path:
        name = posixpath.basename(log_path)
        for v in fresh:
            if archive_filename(v.volid) == name:
                return v
    fresh.sort(key=lambda v: (v.ctime or 0, v.volid), reverse=True)
    return fresh[0] if fresh else None


def verify_archive(new: px.StorageVolume | None, *, vmid: int, gtype: str, compress: str,
                   previous: px.StorageVolume | None, min_size_ratio: float,
                   notes_template: str, guestname: str, node: str,
                   log: VzdumpLog | None = None) -> list[str]:
    """Problems with a new archive (empty: it is good)."""
    if new is None:
        return ["no new archive appeared in the storage content"]
    problems: list[str] = []
    if new.vmid is not None and new.vmid != vmid:
        problems.append(f"archive belongs to vmid {new.vmid}, not {vmid}")
    name = archive_filename(new.volid)
    m = _ARCHIVE_NAME.match(name)
    if m is None or int(m.group("vmid")) != vmid or m.group("type") != gtype:
        problems.append(f"archive name {name!r} is not a {gtype} backup of {vmid}")
    if new.size <= 0:
        problems.append("archive size is 0")
    elif previous is not None and previous.size > 0 and min_size_ratio > 0 \
            and new.size < previous.size * min_size_ratio:
        problems.append(f"archive is {new.size} bytes, less than {min_size_ratio:g} x the "
                        f"previous one ({previous.size} bytes)")
    want = expected_format(gtype, compress)
    if new.format and new.format != want:
        problems.append(f"format {new.format!r}, expected {want!r}")
    if notes_template and not notes_match(notes_template, new.notes, guestname=guestname,
                                          vmid=vmid, node=node):
        problems.append(f"notes {new.notes!r} do not match the template {notes_template!r}")
    if log is not None and log.archive_path and posixpath.basename(log.archive_path) != name:
        problems.append(f"the log wrote {posixpath.basename(log.archive_path)!r}, "
                        f"the storage lists {name!r}")
    return problems


# ====================================================================== schedule period


def period_start(cron: str, tz: str, now: datetime | None = None) -> datetime:
    """The last time ``cron`` fired at or before ``now`` (in the time zone ``tz``)."""
    from cronsim import CronSim

    zone = ZoneInfo(tz)
    now = (now or datetime.now(zone)).astimezone(zone)
    return next(CronSim(cron, now.replace(microsecond=0) + timedelta(seconds=1), reverse=True))


def backed_up_since(backups: Iterable[px.StorageVolume], vmid: int,
                    since: float) -> px.StorageVolume | None:
    """The newest archive of ``vmid`` created at or after ``since`` (epoch), if any."""
    found = [b for b in backups if b.vmid == vmid and (b.ctime or 0) >= since and b.size > 0]
    found.sort(key=lambda b: (b.ctime or 0, b.volid), reverse=True)
    return found[0] if found else None


# ====================================================================== results


@dataclass(frozen=True)
class GuestBackup:
    """The outcome of one guest's vzdump (a row of the run's table)."""

    vmid: int
    node: str
    type: str
    name: str
    status: Status
    volid: str = ""
    size: int = 0
    duration: float = 0.0
    upid: str = ""
    warnings: int = 0
    detail: str = ""
    archive_path: str = ""
    log_tail: tuple[str, ...] = ()
    attempts: int = 1
    ctime: int = 0

    @property
    def good(self) -> bool:
        return self.status in ("ok", "warning", "skipped") and bool(self.volid)


@dataclass(frozen=True)
class RetentionResult:
    vmid: int
    retention: str
    dry_run: bool
    remove: tuple[str, ...] = ()
    kept: int = 0
    protected: int = 0
    removed: tuple[str, ...] = ()


@dataclass
class Row:
    """The artifact row of one guest (mutable while the run fills it in)."""

    guest: str
    vmid: int
    node: str
    archive: str = ""
    size: int = 0
    duration_s: float = 0.0
    status: str = "pending"
    pruned: int | str = ""
    offsite: str = ""
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"guest": self.guest, "vmid": self.vmid, "node": self.node,
                "archive": self.archive, "size": self.size,
                "duration s": round(self.duration_s, 1), "status": self.status,
                "pruned": self.pruned, "offsite": self.offsite,
                "detail": redact(self.detail)[:500]}


# ====================================================================== operations


def running_vzdump(api: Any, node: str, vmid: int) -> px.Upid | None:
    """A vzdump of ``vmid`` already running on ``node`` (e.g. from a killed run)."""
    for task in px.list_tasks(api, node, vmid=vmid, typefilter="vzdump", source="active"):
        if task.id == str(vmid) and task.status is None:
            return px.parse_upid(task.upid)
    return None


def find_archive_path(api: Any, node: str, vmid: int, volid: str,
                      limit: int = 50) -> str | None:
    """Where ``volid`` lives on the node: from the log of the vzdump task that wrote it
    (``creating vzdump archive '/mnt/pve/x/dump/…'``)."""
    name = archive_filename(volid)
    for task in px.list_tasks(api, node, vmid=vmid, typefilter="vzdump", limit=limit):
        if task.status is None:
            continue
        path = parse_log(px.task_log(api, task.upid)).archive_path
        if path and posixpath.basename(path) == name:
            return path
    return None


def backup_guest(api: Any, job: VzdumpJob, target: Target, *, timeout: float | None = None,
                 poll_max: float = 5.0, since: float | None = None,
                 resume_since: float | None = None, slot: NodeSlot | None = None,
                 clock: Callable[[], float] = time.monotonic) -> GuestBackup:
    """Back up one guest and verify the archive.

    Returns a :class:`GuestBackup` with status ``ok``/``warning``, ``locked``
    when the guest holds a lock (the flow retries it later in the run), or
    ``skipped`` when ``since`` (epoch) is given and the guest already has an
    archive from then on (a rerun in the same schedule period: no duplicate).
    ``resume_since`` is for a retried attempt: a good archive made since then
    (by the earlier attempt, which failed after the vzdump) is this backup.
    ``slot`` is held only while the PVE task runs (see :class:`NodeSlot`).
    Raises :class:`VerificationFailed`, :class:`VzdumpTimedOut`,
    :class:`~labkeeper.proxmox.ProxmoxTaskError` (vzdump failed) or a
    :class:`~labkeeper.errors.ServiceError` (transient ones are retried).
    """
    started = clock()
    timeout = timeout if timeout is not None else timeout_seconds(job)
    try:
        return _backup_guest(api, job, target, timeout=timeout, poll_max=poll_max, since=since,
                             resume_since=resume_since, slot=slot, clock=clock,
                             started=started)
    finally:
        if slot is not None:
            slot.give_up()  # no-op when the slot was taken


def _backup_guest(api: Any, job: VzdumpJob, target: Target, *, timeout: float,
                  poll_max: float, since: float | None, resume_since: float | None,
                  slot: NodeSlot | None, clock: Callable[[], float],
                  started: float) -> GuestBackup:
    now = px.find_guest(api, target.vmid)
    if now is None:
        raise PermanentError(f"guest {target.vmid} is no longer in the cluster")
    base = GuestBackup(target.vmid, now.node, now.type, now.name or target.name, "locked")
    if now.lock:
        return replace(base, detail=f"locked ({now.lock})")
    node = now.node
    before = px.backups(api, node, job.storage, vmid=target.vmid)
    upid = running_vzdump(api, node, target.vmid)
    found = [t for t in (since, resume_since) if t is not None]
    done = backed_up_since(before, target.vmid, min(found)) if found else None
    if done is not None:
        older = [b for b in before if (b.ctime or 0) < (done.ctime or 0)]
        if verify_archive(done, vmid=target.vmid, gtype=now.type, compress=job.compress,
                          previous=older[0] if older else None,
                          min_size_ratio=job.min_size_ratio, notes_template=job.notes_template,
                          guestname=base.name or f"{target.vmid}", node=node):
            done = None  # not a good one: back up again
    if upid is None and done is not None:
        if resume_since is not None and (done.ctime or 0) >= resume_since:
            return replace(base, status="ok", volid=done.volid, size=done.size,
                           ctime=done.ctime or 0, duration=clock() - started,
                           detail="the archive an earlier attempt of this task made")
        when = datetime.fromtimestamp(done.ctime or 0).strftime("%Y-%m-%d %H:%M")
        return replace(base, status="skipped", volid=done.volid, size=done.size,
                       ctime=done.ctime or 0,
                       detail=f"already backed up this schedule period ({when})")
    previous = before[0] if before else None
    adopted = upid is not None
    with slot if slot is not None else contextlib.nullcontext():
        started = clock()  # the duration shown is the backup's, not the wait for a slot
        if upid is None:
            try:
                upid = px.vzdump(api, node, vmids=[target.vmid], mode=job.mode,
                                 compress=job.compress, storage=job.storage,  # type: ignore[arg-type]
                                 notes_template=job.notes_template or None, remove=False)
            except px.GuestLocked as exc:
                return replace(base, detail=f"locked ({exc.lock})")
        try:
            result = px.wait_for_task(api, upid, timeout=timeout, max_poll=poll_max,
                                      sleep=proportional_sleep())
        except px.ProxmoxTaskTimeout as exc:
            try:
                px.stop_task(api, upid)
                stopped = "stopped it"
            except LabkeeperError as stop_exc:
                stopped = f"could not stop it: {stop_exc}"
            raise VzdumpTimedOut(f"vzdump of {target.vmid} on {node} ran past {timeout:g}s; "
                                 f"{stopped} (UPID {upid})") from exc
        except px.ProxmoxTaskError as exc:
            lock = px.lock_name("\n".join([exc.exitstatus, *exc.log_tail]))
            if lock is not None:
                return replace(base, detail=f"locked ({lock})", upid=str(upid),
                               log_tail=exc.log_tail[-10:])
            raise
    # the PVE task has ended and the node's slot is free: verify off the critical path
    log = parse_log(result.log)
    after = px.backups(api, node, job.storage, vmid=target.vmid)
    new = pick_new_archive((b.volid for b in before), after, target.vmid, log.archive_path)
    problems = verify_archive(new, vmid=target.vmid, gtype=now.type, compress=job.compress,
                              previous=previous, min_size_ratio=job.min_size_ratio,
                              notes_template=job.notes_template,
                              guestname=base.name or f"{target.vmid}", node=node, log=log)
    if log.skipped_external and target.vmid in log.skipped_external:
        problems.insert(0, "vzdump skipped the guest as external (it moved to another node)")
    if problems:
        raise VerificationFailed(
            f"vzdump of {target.vmid} on {node} finished {result.exitstatus} but the archive "
            f"failed verification: {'; '.join(problems)}", problems)
    assert new is not None
    detail = ("adopted a vzdump already running; " if adopted else "")
    if result.warnings:
        detail += f"{result.exitstatus}: " + "; ".join(log.warnings or result.tail(3))
    return replace(base, status="warning" if result.warnings else "ok", volid=new.volid,
                   size=new.size, duration=clock() - started, upid=str(upid),
                   warnings=result.warnings, detail=detail.strip("; "),
                   archive_path=log.archive_path or "", log_tail=result.tail(10),
                   ctime=new.ctime or 0)


def apply_retention(api: Any, node: str, storage: str, vmid: int, gtype: px.GuestType,
                    retention: PruneRetention, *, dry_run: bool = False,
                    timeout: float = 600, poll_max: float = 2.0) -> RetentionResult:
    """Prune one guest's backups on ``storage`` with PVE's semantics (``prunebackups``).

    Lists the marks first (the dry run); removes only volumes marked ``remove``
    (PVE never marks a protected backup ``remove``), then checks they are gone.
    """
    policy = retention.as_pve()
    marks = px.prune_dry_run(api, node, storage, prune_backups=policy, vmid=vmid, gtype=gtype)
    remove = tuple(sorted(m.volid for m in marks if m.mark == "remove"))
    kept = sum(1 for m in marks if m.mark == "keep")
    protected = sum(1 for m in marks if m.mark == "protected")
    result = RetentionResult(vmid, policy, dry_run, remove, kept, protected)
    if dry_run or not remove:
        return result
    upid = px.prune_backups(api, node, storage, vmid=vmid, prune_backups=policy, gtype=gtype)
    px.wait_for_task(api, upid, timeout=timeout, max_poll=poll_max,
                     sleep=proportional_sleep())
    left = {b.volid for b in px.backups(api, node, storage, vmid=vmid)}
    still = [v for v in remove if v in left]
    if still:
        raise ServiceError(f"prune of {vmid} on {node}/{storage} left {still}",
                           service="proxmox", transient=True)
    return replace(result, removed=remove)


# ====================================================================== native jobs


@dataclass(frozen=True)
class NativeChange:
    action: Literal["create", "update", "delete", "unchanged"]
    job_id: str
    params: Mapping[str, Any] = field(default_factory=dict)
    changes: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        what = "; ".join(self.changes) if self.changes else ""
        extra = f" ({'; '.join(self.notes)})" if self.notes else ""
        return f"{self.action:9} {self.job_id}{': ' + what if what else ''}{extra}"


_CRON_NAMES = (
    {}, {}, {},
    {m: i + 1 for i, m in enumerate(("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                     "sep", "oct", "nov", "dec"))},
    {d: i for i, d in enumerate(("sun", "mon", "tue", "wed", "thu", "fri", "sat"))},
)
_CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_PVE_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def _cron_set(text: str, index: int) -> set[int] | None:
    """Expand one cron field; None for ``*``."""
    lo, hi = _CRON_RANGES[index]
    names = _CRON_NAMES[index]
    if text == "*":
        return None
    out: set[int] = set()

    def value(s: str) -> int:
        return names[s.lower()] if s.lower() in names else int(s)

    for item in text.split(","):
        base, _, step = item.partition("/")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a, b = (value(x) for x in base.split("-", 1))
        else:
            a = value(base)
            b = hi if step else a
        out.update(range(a, b + 1, int(step) if step else 1))
    if index == 4 and 7 in out:
        out = (out - {7}) | {0}
    return out


def _compact(values: set[int], width: int = 0) -> str:
    """``{1,2,3,7}`` → ``1..3,7`` (PVE calendar syntax)."""
    nums = sorted(values)
    parts: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        a, b = str(nums[i]).zfill(width), str(nums[j]).zfill(width)
        parts.append(a if i == j else (f"{a},{b}" if j == i + 1 else f"{a}..{b}"))
        i = j + 1
    return ",".join(parts)


def cron_to_calendar(cron: str) -> str:
    """A 5-field cron expression as a PVE calendar event (``30 1 * * 6`` → ``sat 01:30``).

    Raises ValueError for what PVE cannot express the same way (cron ORs a
    restricted day-of-month with a restricted day-of-week; PVE ANDs them).
    """
    fields = cron.split()
    if len(fields) != 5:
        raise ValueError(f"not a 5-field cron expression: {cron!r}")
    minute, hour, dom, month, dow = (_cron_set(f, i) for i, f in enumerate(fields))
    if dom is not None and dow is not None:
        raise ValueError("cron with both day-of-month and day-of-week restricted has no "
                         "PVE calendar equivalent")
    parts: list[str] = []
    if dow is not None:
        order = [1, 2, 3, 4, 5, 6, 0]
        parts.append(",".join(_PVE_DAYS[d] for d in order if d in dow))
    if dom is not None or month is not None:
        parts.append(f"*-{_compact(month, 2) if month else '*'}-{_compact(dom, 2) if dom else '*'}")
    h = _compact(hour, 2) if hour is not None else "*"
    m = _compact(minute, 2) if minute is not None else "*"
    parts.append(f"{h}:{m}")
    return " ".join(parts)


def native_job_id(job: VzdumpJob) -> str:
    return f"{NATIVE_PREFIX}{job.name}"


def native_job_params(job: VzdumpJob, cluster: Iterable[px.Guest],
                      inventory_names: Mapping[str, int]) -> tuple[dict[str, Any], list[str]]:
    """The ``/cluster/backup`` parameters for ``job`` and notes about the translation.

    PVE jobs select by vmid list, ``all`` (+ ``exclude``), ``pool`` and ``node``;
    tags and inventory names are resolved to vmids now (a re-sync picks up new
    guests), as are ``exclude_tags``.
    """
    sel = job.selection
    notes: list[str] = []
    guests = list(cluster)
    params: dict[str, Any] = {
        "schedule": cron_to_calendar(job.schedule), "storage": job.storage,
        "mode": job.mode, "compress": job.compress, "prune-backups": job.retention.as_pve(),
        "notes-template": job.notes_template or None, "enabled": 1 if job.enabled else 0,
        "comment": NATIVE_COMMENT, "node": sel.node,
    }
    excluded = set(sel.exclude)
    if sel.exclude_tags:
        excluded.update(g.vmid for g in guests if set(sel.exclude_tags) & set(g.tags))
        notes.append("exclude_tags resolved to vmids now")
    simple_all = sel.all or not (sel.vmids or sel.guests or sel.tags or sel.pool)
    if simple_all:
        params["all"] = 1
    elif sel.pool and not (sel.vmids or sel.guests or sel.tags):
        params["pool"] = sel.pool
    else:
        resolved = resolve_selection(sel, guests, inventory_names)
        params["vmid"] = px.join_ids(t.vmid for t in resolved.targets) or None
        excluded = set()
        if sel.tags or sel.guests:
            notes.append("tags/guests resolved to vmids now: re-run sync-jobs after "
                         "adding guests")
        if not params["vmid"]:
            notes.append("the selection matches no guest now")
    if excluded and ("all" in params or "pool" in params):
        params["exclude"] = px.join_ids(sorted(excluded))
    notes.append("schedule runs in the nodes' time zone")
    return {k: v for k, v in params.items() if v is not None}, notes


_COMPARED = ("schedule", "storage", "mode", "compress", "prune-backups", "notes-template",
             "enabled", "comment", "node", "all", "pool", "vmid", "exclude")


def _existing_value(job: px.BackupJob, key: str) -> Any:
    raw = job.model_dump(by_alias=True)
    extra = getattr(job, "model_extra", None) or {}
    value = raw.get(key, extra.get(key))
    if key == "prune-backups" and isinstance(value, Mapping):
        value = px.format_retention({k: int(v) for k, v in value.items()})
    if key in ("enabled", "all"):
        value = 1 if value in (True, 1, "1") else 0
    return value


def _norm(key: str, value: Any) -> str:
    if value is None:
        return "0" if key in ("enabled", "all") else ""
    if key == "prune-backups" and isinstance(value, str):
        return ",".join(sorted(value.split(",")))
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def plan_native_jobs(jobs: Iterable[VzdumpJob], existing: Iterable[px.BackupJob],
                     cluster: Iterable[px.Guest],
                     inventory_names: Mapping[str, int]) -> list[NativeChange]:
    """What sync-jobs would do: create/update jobs for ``native: true`` inventory
    jobs, delete ``labkeeper-*`` jobs the inventory no longer marks native. Jobs
    without the prefix belong to the user and are never touched."""
    guests = list(cluster)
    have = {j.id: j for j in existing}
    plan: list[NativeChange] = []
    wanted: set[str] = set()
    for job in jobs:
        if not job.native:
            continue
        jid = native_job_id(job)
        wanted.add(jid)
        params, notes = native_job_params(job, guests, inventory_names)
        current = have.get(jid)
        if current is None:
            plan.append(NativeChange("create", jid, params, (), tuple(notes)))
            continue
        changes = []
        for key in _COMPARED:
            old, new = _norm(key, _existing_value(current, key)), _norm(key, params.get(key))
            if old != new:
                changes.append(f"{key}: {old or '-'} → {new or '-'}")
        plan.append(NativeChange("update" if changes else "unchanged", jid, params,
                                 tuple(changes), tuple(notes)))
    for jid in sorted(have):
        if jid.startswith(NATIVE_PREFIX) and jid not in wanted:
            plan.append(NativeChange("delete", jid))
    return plan


def apply_native_plan(api: Any, plan: Iterable[NativeChange]) -> list[str]:
    """Carry out a plan; returns one line per change made."""
    done: list[str] = []
    for change in plan:
        p = dict(change.params)
        if change.action == "create":
            schedule = p.pop("schedule")
            vmids = [int(v) for v in str(p.pop("vmid", "") or "").split(",") if v]
            all_guests = bool(p.pop("all", 0)) or None
            pool = p.pop("pool", None)
            px.create_backup_job(api, change.job_id, schedule=schedule, vmids=vmids,
                                 all_guests=all_guests, pool=pool,
                                 **{k.replace("-", "_"): v for k, v in p.items()})
        elif change.action == "update":
            schedule = p.pop("schedule")
            vmids = [int(v) for v in str(p.pop("vmid", "") or "").split(",") if v]
            all_guests = bool(p.pop("all", 0)) or None
            pool = p.pop("pool", None)
            selectors = {"vmid": vmids, "all": all_guests, "pool": pool,
                         "exclude": p.get("exclude"), "node": p.get("node")}
            delete = [k for k, v in selectors.items() if not v]
            px.update_backup_job(api, change.job_id, schedule=schedule, vmids=vmids,
                                 all_guests=all_guests, pool=pool, delete=delete,
                                 **{k.replace("-", "_"): v for k, v in p.items()})
        elif change.action == "delete":
            px.delete_backup_job(api, change.job_id)
        else:
            continue
        done.append(change.line())
    return done
