"""vzdump jobs marked ``native: true`` mirrored as Proxmox ``/cluster/backup`` jobs:
the plan (create / update / delete / unchanged) and applying it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from labkeeper import proxmox as px
from labkeeper.inventory import VzdumpJob
from labkeeper.vzdump.plan import resolve_selection

NATIVE_PREFIX = "labkeeper-"
NATIVE_COMMENT = "managed by labkeeper (labkeeper vzdump sync-jobs)"


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


_CRON_NAMES: tuple[dict[str, int], ...] = (
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
