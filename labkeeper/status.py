"""`labkeeper status`: is my lab safe? One row per thing that must be recent enough.

Sources: restic snapshots (database dumps and path sets), Proxmox storage content
(vzdump archives), the metrics store (drills and updates, recorded by their flows),
PITR archiving (slot, spool and repository: :mod:`labkeeper.pitr.lag`) and the
Prefect run history (failed runs; read by the caller and passed in).
Evaluation is pure: :func:`evaluate` turns facts into rows; anything late,
missing or failed makes :func:`exit_code` non-zero so the command can feed a monitor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

from labkeeper.errors import ServiceError
from labkeeper.inventory import Inventory
from labkeeper.notify import Alert
from labkeeper.pg_backup import complete_dumps

State = Literal["ok", "late", "missing", "failed", "warn", "info"]
BAD: frozenset[str] = frozenset({"late", "missing", "failed"})


@dataclass(frozen=True)
class Row:
    section: str
    target: str
    state: State
    last: datetime | None
    objective: str
    detail: str = ""
    allowed: timedelta | None = None
    """How old the last good backup may be (the RPO, or a schedule period plus grace)."""

    def age(self, now: datetime) -> timedelta | None:
        return None if self.last is None else now - self.last

    def overdue(self, now: datetime) -> timedelta | None:
        """By how much the last backup is older than allowed (None: not late)."""
        age = self.age(now)
        if age is None or self.allowed is None or age <= self.allowed:
            return None
        return age - self.allowed

    def as_dict(self, now: datetime) -> dict[str, Any]:
        d = asdict(self)
        d["last"] = self.last.isoformat(timespec="seconds") if self.last else None
        age = self.age(now)
        d["age_hours"] = round(age.total_seconds() / 3600, 2) if age is not None else None
        allowed = d.pop("allowed")
        d["allowed_hours"] = round(allowed.total_seconds() / 3600, 2) if allowed else None
        return d


@dataclass(frozen=True)
class Facts:
    """What was read from the lab, keyed so :func:`evaluate` needs no I/O."""

    now: datetime
    snapshots: Mapping[str, Iterable[Any]] = field(default_factory=dict)
    """repository name -> restic snapshots (objects with ``time`` and ``tags``)."""
    archives: Mapping[int, datetime] = field(default_factory=dict)
    """vmid -> ctime of its newest vzdump archive."""
    metrics: Iterable[Any] = ()
    """metrics samples (``name``, ``labels``, ``value``)."""
    failed_runs: Iterable[Mapping[str, Any]] = ()
    """failed/crashed flow runs of the last days: name, flow, state, start."""
    errors: Iterable[tuple[str, str]] = ()
    """(source, message) for sources that could not be read."""
    pending: Mapping[str, Iterable[Any]] = field(default_factory=dict)
    """"host/set" -> failed path-backup attempts whose cleanup is still pending
    (objects with ``backup_id``, ``since`` and ``reason``)."""
    pins: Iterable[Any] = ()
    """Compose apps pinned to their good images after a rollback (``update.Pin``)."""
    journals: Iterable[tuple[Any, bool]] = ()
    """Unfinished updates (``update.Journal``) and whether each is stale."""
    pitr: Mapping[str, Any] = field(default_factory=dict)
    """PITR server -> its :class:`labkeeper.pitr.lag.LagFacts`."""


def cron_period(cron: str, tz: str, now: datetime) -> timedelta:
    """The time between the last two fires of ``cron`` before ``now``."""
    from cronsim import CronSim

    local = now.astimezone(ZoneInfo(tz)).replace(microsecond=0)
    it = CronSim(cron, local, reverse=True)
    last, before = next(it), next(it)
    return last - before


def grace(period: timedelta) -> timedelta:
    """How late a scheduled job may be before it counts as late: one period, plus
    10% of it (at least an hour) for a slow run."""
    return period + max(timedelta(hours=1), period / 10)


def _newest(snaps: Iterable[Any], required: set[str]) -> datetime | None:
    times = [s.time for s in snaps if required <= set(s.tags)]
    return max(times) if times else None


def fmt_age(td: timedelta) -> str:
    hours = td.total_seconds() / 3600
    return f"{hours / 24:.1f} d" if hours >= 48 else f"{hours:.1f} h"


BACKUP_SECTIONS: frozenset[str] = frozenset({"database", "paths", "guest", "pitr"})
"""The sections that are backup series (what the dead-man's check watches)."""


def evaluate(inv: Inventory, facts: Facts) -> list[Row]:
    now = facts.now
    rows: list[Row] = []
    tz = inv.lab.timezone
    unread = {source for source, _ in facts.errors}
    for db in inv.databases:
        repo = inv.repository_for(db)
        series = f"db:{inv.database_server(db)}/{db.name}"
        rpo = timedelta(hours=db.drill.rpo_hours)
        if f"repository {repo.name}" in unread:
            rows.append(_unchecked("database", db.name, f"RPO {fmt_age(rpo)}",
                                   f"repository {repo.name}", rpo))
            continue
        # a dump counts only with its manifest (a failed attempt's leftover never does)
        last = _newest(complete_dumps(list(facts.snapshots.get(repo.name, ()))),
                       {"labkeeper", series, "kind:pg_dump"})
        rows.append(_judge("database", db.name, last, rpo, now,
                           f"RPO {fmt_age(rpo)}", f"{series} in {repo.name}"))
    for ps in inv.path_backups:
        repo = inv.repository_for(ps)
        series = f"paths:{ps.host}/{ps.name}"
        period = cron_period(ps.schedule, tz, now)
        if f"repository {repo.name}" in unread:
            rows.append(_unchecked("paths", f"{ps.host}/{ps.name}", f"every {fmt_age(period)}",
                                   f"repository {repo.name}", grace(period)))
            continue
        last = _newest(facts.snapshots.get(repo.name, ()), {"labkeeper", series, "kind:paths"})
        rows.append(_judge("paths", f"{ps.host}/{ps.name}", last, grace(period), now,
                           f"every {fmt_age(period)}", series))
    for target, attempts in sorted(facts.pending.items()):
        rows.append(_pending_row(target, list(attempts)))
    for job in inv.vzdump_jobs:
        if not job.enabled:
            continue
        period = cron_period(job.schedule, tz, now)
        for vmid, name in _job_guests(inv, job):
            objective = f"{job.name}: every {fmt_age(period)}"
            if "proxmox" in unread:
                rows.append(_unchecked("guest", f"{name} ({vmid})", objective, "proxmox",
                                       grace(period)))
                continue
            last = facts.archives.get(vmid)
            rows.append(_judge("guest", f"{name} ({vmid})", last, grace(period), now,
                               objective, f"vzdump job {job.name}"))
    rows += _pitr_rows(inv, facts)
    rows += _from_metrics(facts.metrics, now)
    rows += _update_rows(facts.pins, facts.journals)
    for run in facts.failed_runs:
        start = run.get("start")
        late = run.get("state") == "Late"  # due, no worker took it (tasks.history.late_runs)
        rows.append(Row("runs", f"{run.get('flow')}/{run.get('name')}",
                        "late" if late else "warn",
                        start if isinstance(start, datetime) else None,
                        "taken by a worker" if late else "last 7 days",
                        str(run.get("detail") or run.get("state", "Failed"))))
    for source, message in facts.errors:
        rows.append(Row("source", source, "failed", None, "readable", message))
    return rows


def _judge(section: str, target: str, last: datetime | None, allowed: timedelta,
           now: datetime, objective: str, detail: str) -> Row:
    if last is None:
        return Row(section, target, "missing", None, objective, f"no backup found: {detail}",
                   allowed)
    state: State = "ok" if now - last <= allowed else "late"
    return Row(section, target, state, last, objective, detail, allowed)


# -- PITR archiving: receive, slot retention, ship, base backups -------------------------

MB = 1024 * 1024


def _pitr_rows(inv: Inventory, facts: Facts) -> list[Row]:
    from labkeeper.inventory.pitr import pitr_servers

    rows: list[Row] = []
    for cfg in pitr_servers(inv):
        lag = facts.pitr.get(cfg.name)
        if lag is None:
            rows.append(_unchecked("pitr", f"{cfg.name} ship",
                                   f"RPO {cfg.objectives.rpo_minutes} min", "the PITR server",
                                   timedelta(minutes=cfg.objectives.rpo_minutes)))
            continue
        rows += [pitr_receive_row(cfg, lag), pitr_slot_row(cfg, lag),
                 pitr_ship_row(cfg, lag, facts.now),
                 pitr_base_row(cfg, lag, facts.now, inv.lab.timezone)]
    return rows


def pitr_receive_row(cfg: Any, lag: Any) -> Row:
    """Is WAL being received? failed when not at all (no slot, slot lost, server not
    answering), warn when the slot has no receiver (the server's disk fills)."""
    target, objective, slot = f"{cfg.name} receive", "slot active", cfg.slot_name
    if lag.errors:
        return Row("pitr", target, "failed", None, objective, "; ".join(lag.errors))
    if not lag.slot_exists:
        return Row("pitr", target, "failed", None, objective, f"replication slot {slot} "
                   "does not exist: WAL is not being archived (start `labkeeper wal receive`)")
    if lag.wal_status == "lost":
        return Row("pitr", target, "failed", None, objective, f"slot {slot} is lost: WAL "
                   "beyond max_slot_wal_keep_size was removed; take a new base backup")
    behind = f"{(lag.retained_bytes or 0) // MB} MiB behind the server's WAL"
    if not lag.slot_active:
        return Row("pitr", target, "warn", None, objective, f"slot {slot} is inactive: no "
                   f"receiver is running ({behind}; the server keeps it all)")
    return Row("pitr", target, "ok", None, objective, f"receiving ({behind})")


def pitr_slot_row(cfg: Any, lag: Any) -> Row:
    """How much WAL the slot makes the server keep: warn past ``warn.slot_retained_mb``
    or when ``wal_status`` is ``unreserved`` (about to be removed), failed when lost."""
    limit = cfg.warn.slot_retained_mb
    target, objective = f"{cfg.name} slot retention", f"<= {limit} MiB on the server"
    retained = lag.retained_bytes
    if lag.wal_status == "lost":
        return Row("pitr", target, "failed", None, objective, "wal_status lost")
    if retained is None:
        return Row("pitr", target, "info", None, objective, "no slot to measure")
    detail = f"{retained // MB} MiB retained (wal_status {lag.wal_status or '?'})"
    if lag.safe_wal_size is not None:
        detail += f", {lag.safe_wal_size // MB} MiB left before max_slot_wal_keep_size"
    if lag.wal_status == "unreserved" or retained > limit * MB:
        return Row("pitr", target, "warn", None, objective, detail)
    return Row("pitr", target, "ok", None, objective, detail)


def pitr_ship_row(cfg: Any, lag: Any, now: datetime) -> Row:
    """How old the newest WAL in the repository is (late past the RPO) and how long
    completed segments wait in the spool (warn past ``warn.ship_lag_minutes``: before
    the RPO is lost)."""
    rpo = timedelta(minutes=cfg.objectives.rpo_minutes)
    target, objective = f"{cfg.name} ship", f"RPO {cfg.objectives.rpo_minutes} min"
    last = lag.newest_wal_in_repo
    spool = f"{lag.spool_ready} segment(s) waiting in the spool"
    waiting = lag.oldest_ready_age_s
    if waiting is not None:
        spool += f", the oldest for {waiting / 60:.0f} min"
    if last is None:
        return Row("pitr", target, "missing", None, objective, f"no WAL in the repository; "
                   f"{spool}", rpo)
    if now - last > rpo:
        return Row("pitr", target, "late", last, objective, spool, rpo)
    if waiting is not None and waiting > cfg.warn.ship_lag_minutes * 60:
        return Row("pitr", target, "warn", last, objective,
                   f"{spool}: shipping is not keeping up (warn at "
                   f"{cfg.warn.ship_lag_minutes} min)", rpo)
    return Row("pitr", target, "ok", last, objective, spool, rpo)


def pitr_base_row(cfg: Any, lag: Any, now: datetime, tz: str) -> Row:
    period = cron_period(cfg.base_schedule, tz, now)
    return _judge("pitr", f"{cfg.name} base backup", lag.newest_base_in_repo, grace(period),
                  now, f"every {fmt_age(period)}", f"pg:{cfg.name} base backups")


def _pending_row(target: str, attempts: list[Any]) -> Row:
    """Failed path-backup attempts whose cleanup did not finish: their restic may still
    run on the host and their snapshots are not forgotten yet. A warning, not a late
    backup: the next backup of the set sweeps them first."""
    since = min((str(a.since) for a in attempts), default="")
    ids = ", ".join(str(a.backup_id) for a in attempts)
    last_reason = str(attempts[-1].reason) if attempts else ""
    detail = (f"{len(attempts)} failed attempt(s) not cleaned up yet ({ids}); the next "
              "backup of this set sweeps them first")
    if last_reason:
        detail += f"; last reason: {last_reason}"
    try:
        first = datetime.fromisoformat(since) if since else None
    except ValueError:
        first = None
    return Row("paths", f"{target} cleanup", "warn", first, "no pending cleanup", detail)


def _unchecked(section: str, target: str, objective: str, source: str,
               allowed: timedelta) -> Row:
    """A series whose source could not be read: not known to be safe, so not ok — but
    not reported as missing either (the source row says what went wrong)."""
    return Row(section, target, "failed", None, objective, f"not checked: {source} not readable",
               allowed)


def _job_guests(inv: Inventory, job: Any) -> list[tuple[int, str]]:
    """The inventory guests a job's selection names statically (vmids, guests, tags,
    node, all), minus excludes. Guests only Proxmox knows about are not listed."""
    sel = job.selection
    out = []
    for g in inv.guests:
        if g.state == "absent":
            continue
        chosen = (sel.all or g.vmid in (sel.vmids or []) or g.name in (sel.guests or [])
                  or bool(set(sel.tags or []) & set(g.tags)) or (sel.pool and g.pool == sel.pool))
        if sel.node and g.node != sel.node:
            chosen = False
        if g.vmid in (sel.exclude or []) or set(sel.exclude_tags or []) & set(g.tags):
            chosen = False
        if chosen:
            out.append((g.vmid, g.name))
    return out


def _from_metrics(samples: Iterable[Any], now: datetime) -> list[Row]:
    """Drills and updates, as their flows recorded them in the metrics store."""
    by: dict[tuple[str, str], dict[str, float]] = {}
    for s in samples:
        for prefix, section in (("labkeeper_drill_", "drill"), ("labkeeper_update_", "update")):
            if s.name.startswith(prefix):
                target = s.labels.get("target") or s.labels.get("app") or \
                    ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                by.setdefault((section, target), {})[s.name.removeprefix(prefix)] = s.value
    rows = []
    for (section, target), vals in sorted(by.items()):
        ts = vals.get("last_run_timestamp_seconds")
        last = datetime.fromtimestamp(ts, UTC) if ts else None
        if section == "drill":
            ok = vals.get("success", 0) == 1
            detail = ", ".join(f"{k.split('_')[0].upper()} {fmt_age(timedelta(seconds=v))}"
                               for k, v in vals.items() if k in ("rto_seconds", "rpo_seconds"))
            rows.append(Row("drill", target, "ok" if ok else "failed", last,
                            "passes its objectives", detail))
        else:
            rows.append(_update_metric_row(target, vals, last))
    return rows


_NOT_UPDATED = {"blocked": "blocked: another update of its guest held the lock",
                "held": "held: the registry offers only images rolled back before",
                "stale": "an unfinished update waits for a decision"}


def _update_metric_row(target: str, vals: Mapping[str, float], last: datetime | None) -> Row:
    """The last update run of an app, as its flow recorded it."""
    rolled = vals.get("rolled_back", 0) == 1
    ok = vals.get("success", 0) == 1
    state: State = "ok" if ok else ("warn" if rolled else "failed")
    detail = "rolled back" if rolled else ("succeeded" if ok else "failed")
    for key, text in _NOT_UPDATED.items():
        if vals.get(key, 0) == 1:
            state, detail = ("warn" if key == "held" else "failed"), text
    return Row("update", target, state, last, "last update healthy", detail)


def _update_rows(pins: Iterable[Any], journals: Iterable[tuple[Any, bool]]) -> list[Row]:
    """Pinned apps (a warning: healthy, but not updating) and unfinished updates (a
    failure when too old to finish automatically: a person must decide)."""
    rows = []
    for pin in pins:
        since = datetime.fromtimestamp(pin.since, UTC) if pin.since else None
        rows.append(Row("update", f"{pin.app} pinned", "warn", since,
                        "on the registry's newest images", f"rolled back: {pin.text()}"))
    for journal, stale in journals:
        when = journal.touched or journal.started
        last = datetime.fromtimestamp(when, UTC) if when else None
        what = f"run {journal.run_id} stopped after '{journal.phase}'"
        if stale:
            rows.append(Row("update", f"{journal.app} unfinished", "failed", last,
                            "no unfinished update", f"{what}: too old to finish "
                            "automatically; decide: labkeeper update "
                            f"{journal.app} --resolve keep|rollback"))
        else:
            rows.append(Row("update", f"{journal.app} unfinished", "warn", last,
                            "no unfinished update",
                            f"{what}: the next update run finishes it"))
    return rows


def exit_code(rows: Iterable[Row]) -> int:
    return 1 if any(r.state in BAD for r in rows) else 0


# -- the dead-man's check: which rows make a message ----------------------------------

_WHAT = {"database": "database", "paths": "path set", "guest": "guest", "pitr": "PITR"}
WATCHED_SOURCES = ("repository ", "proxmox")


def watched(rows: Iterable[Row]) -> list[Row]:
    """The rows the dead-man's check judges: backup series, and the sources they are
    read from (a repository or Proxmox that cannot be read)."""
    return [r for r in rows if r.section in BACKUP_SECTIONS or
            (r.section == "source" and r.target.startswith(WATCHED_SOURCES))]


def alert_key(row: Row) -> str:
    return f"{row.section}:{row.target}"


def _when(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def late_summary(row: Row, now: datetime) -> str:
    """One line saying what is late and by how much (or missing, or unreadable)."""
    what = f"{_WHAT.get(row.section, row.section)} {row.target}"
    if row.section == "source":
        return f"{row.target} could not be read: {row.detail}"
    if row.state == "missing":
        return f"{what}: no backup found (objective: {row.objective})"
    overdue, age = row.overdue(now), row.age(now)
    if row.state == "late" and overdue is not None and age is not None and row.last:
        return (f"{what}: last good backup {fmt_age(age)} ago ({_when(row.last)}), "
                f"{fmt_age(overdue)} past its objective ({row.objective})")
    return f"{what}: {row.state} ({row.detail})"


@dataclass(frozen=True)
class WatchMessages:
    alerts: list[Alert]
    """One per late/missing series or unreadable source."""
    recoveries: dict[str, tuple[str, str]]
    """alert key -> (title, body) for every series that is fine now."""
    unknown: frozenset[str]
    """Keys of series that could not be checked: neither late nor recovered."""


def watch_alerts(rows: Iterable[Row], now: datetime, lab: str) -> WatchMessages:
    """What the dead-man's check may say about ``rows``."""
    alerts: list[Alert] = []
    recoveries: dict[str, tuple[str, str]] = {}
    unknown: set[str] = set()
    for r in watched(rows):
        key = alert_key(r)
        what = f"{_WHAT.get(r.section, r.section)} {r.target}"
        if r.section == "source":
            title = f"labkeeper: cannot check backups: {r.target} not readable"
            alerts.append(Alert(key, r.state, title, f"{late_summary(r, now)}\nlab: {lab}"))
        elif r.state in ("late", "missing") or (r.section == "pitr" and r.state in BAD):
            alerts.append(Alert(key, r.state, f"labkeeper: backup of {what} is {r.state}",
                                f"{late_summary(r, now)}\n{r.detail}\nlab: {lab}"))
        elif r.section == "pitr" and r.state == "warn":  # before it hurts
            alerts.append(Alert(key, r.state, f"labkeeper: {what}: warning",
                                f"{late_summary(r, now)}\nlab: {lab}"))
        elif r.state == "ok":
            age = r.age(now)
            recoveries[key] = (f"labkeeper: backup of {what} is within its objective again",
                               f"{what}: last good backup "
                               f"{fmt_age(age) if age is not None else '?'} ago "
                               f"({r.objective})\nlab: {lab}")
        else:
            unknown.add(key)
    return WatchMessages(alerts, recoveries, frozenset(unknown))


# -- gathering (I/O) -------------------------------------------------------------------

def gather(inv: Inventory, *, failed_runs: Iterable[Mapping[str, Any]] = (),
           now: datetime | None = None) -> Facts:
    """Read restic snapshots, vzdump archives and the metrics store. A source that
    cannot be read becomes an error row, never an exception."""
    from labkeeper import metrics, path_backup, restic
    from labkeeper.restic.repository import repo_for

    now = now or datetime.now(UTC)
    errors: list[tuple[str, str]] = []
    snapshots: dict[str, list[Any]] = {}
    wanted = {inv.repository_for(d).name for d in inv.databases} | \
        {inv.repository_for(p).name for p in inv.path_backups}
    for name in sorted(wanted):
        try:
            snapshots[name] = restic.snapshots(repo_for(inv, name), tags=("labkeeper",),
                                               timeout=120)
        except Exception as exc:
            errors.append((f"repository {name}", str(exc)))
    archives: dict[int, datetime] = {}
    if inv.vzdump_jobs and inv.proxmox is not None:
        try:
            archives = _newest_archives(inv)
        except Exception as exc:
            errors.append(("proxmox", str(exc)))
    try:
        samples = metrics.Store(inv.settings.state_dir).samples()
    except OSError as exc:
        samples, errors = [], [*errors, ("metrics", str(exc))]
    pending: dict[str, list[Any]] = {}
    for ps in inv.path_backups:
        try:
            attempts = path_backup.PendingCleanups(inv.settings.state_dir, ps.host,
                                                   ps.name).read()
        except Exception as exc:
            errors.append((f"pending cleanups of {ps.host}/{ps.name}", str(exc)))
            continue
        if attempts:
            pending[f"{ps.host}/{ps.name}"] = attempts
    pins, journals = _updates(inv, errors)
    return Facts(now=now, snapshots=snapshots, archives=archives, metrics=samples,
                 failed_runs=list(failed_runs), errors=errors, pending=pending, pins=pins,
                 journals=journals, pitr=_pitr_lag(inv))


def _pitr_lag(inv: Inventory) -> dict[str, Any]:
    """Each PITR server's lag facts (a server that cannot be resolved: facts whose
    ``errors`` say why, never an exception)."""
    from labkeeper.errors import LabkeeperError
    from labkeeper.inventory.pitr import pitr_servers
    from labkeeper.pitr import lag, target

    out: dict[str, Any] = {}
    for cfg in pitr_servers(inv):
        try:
            out[cfg.name] = lag.gather(target.resolve(inv, cfg.name, match_client=False))
        except LabkeeperError as exc:
            out[cfg.name] = lag.LagFacts(server=cfg.name, errors=[str(exc)])
    return out


def _updates(inv: Inventory, errors: list[tuple[str, str]]
             ) -> tuple[list[Any], list[tuple[Any, bool]]]:
    """Pins and unfinished updates from the state dir (unreadable: an error row)."""
    from labkeeper import update

    try:
        pins = update.pins(inv)
    except Exception as exc:
        pins = []
        errors.append(("update pins", str(exc)))
    journals: list[tuple[Any, bool]] = []
    try:
        apps = {a.name: a for a in inv.apps}
        for j in update.open_journals(inv):
            app = apps.get(j.app)
            journals.append((j, app is None or update.is_stale(j, app)))
    except Exception as exc:
        errors.append(("update journals", str(exc)))
    return pins, journals


def _newest_archives(inv: Inventory) -> dict[int, datetime]:
    from labkeeper import proxmox as px

    api = px.connect(inv.proxmox)  # type: ignore[arg-type]
    out: dict[int, datetime] = {}
    storages = {job.storage for job in inv.vzdump_jobs}
    for node in px.node_names(api):
        for storage in sorted(storages):
            try:
                vols = px.backups(api, node, storage)
            except ServiceError as exc:
                if exc.transient:
                    raise
                continue  # the storage is not on this node
            for v in vols:
                if v.vmid is None or not v.ctime:
                    continue
                when = datetime.fromtimestamp(v.ctime, UTC)
                if v.vmid not in out or when > out[v.vmid]:
                    out[v.vmid] = when
    return out
