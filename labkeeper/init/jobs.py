"""Proxmox backup jobs as ``vzdump_jobs`` entries (pure): imported with ``enabled: false``
(Proxmox still runs them), or written as a comment when the inventory cannot hold them."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from labkeeper import provision as pv
from labkeeper.init.model import ClusterFacts
from labkeeper.init.pve_calendar import calendar_to_cron
from labkeeper.init.values import as_int, unique_name
from labkeeper.init.yamltext import Note, emit

JOB_KEYS = frozenset({"id", "type", "schedule", "enabled", "storage", "vmid", "all", "pool",
                      "node", "mode", "compress", "prune-backups", "notes-template",
                      "exclude", "next-run", "comment"})


def _retention(job: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    raw = job.get("prune-backups")
    if isinstance(raw, str):
        raw = pv.parse_props(raw)
    keep: dict[str, Any] = {}
    for key, value in dict(raw or {}).items():
        n = as_int(value)
        if key == "keep-all" and n:
            return {"keep_all": True}, ""
        if key.startswith("keep-") and n:
            keep[key.replace("-", "_")] = n
    if keep:
        return keep, ""
    return {"keep_all": True}, ("TODO: the Proxmox job has no retention of its own (the "
                                "storage's prune-backups applied): choose keep_* here")


def _selection(job: Mapping[str, Any], vmids: set[int]) -> tuple[dict[str, Any], list[str]]:
    notes: list[str] = []
    sel: dict[str, Any] = {}
    listed = [int(v) for v in re.split(r"[,;\s]+", str(job.get("vmid") or "")) if v.isdigit()]
    excluded = [int(v) for v in re.split(r"[,;\s]+", str(job.get("exclude") or ""))
                if v.isdigit()]
    gone = sorted({*listed, *excluded} - vmids)
    if gone:
        notes.append(f"vmids no longer in the cluster left out: {', '.join(map(str, gone))}")
    if as_int(job.get("all", 0)):
        sel["all"] = True
    elif listed:
        sel["vmids"] = [v for v in listed if v in vmids]
    if job.get("pool") and "vmids" not in sel:
        sel["pool"] = str(job["pool"])
    if job.get("node"):
        sel["node"] = str(job["node"])
    if [v for v in excluded if v in vmids]:
        sel["exclude"] = [v for v in excluded if v in vmids]
    return sel, notes


def describe_job(job: Mapping[str, Any], *, name: str, vmids: set[int],
                 backup_storages: set[str]) -> Note:
    """One Proxmox backup job as a ``vzdump_jobs`` entry (pure)."""
    jid = str(job.get("id", name))
    above = [f"Proxmox backup job {jid} (schedule {job.get('schedule', '?')!r}, "
             f"{'enabled' if as_int(job.get('enabled', 1)) else 'disabled'} in Proxmox)."]
    sel, notes = _selection(job, vmids)
    data: dict[str, Any] = {"name": name, "selection": sel, "storage": job.get("storage")}
    data["mode"] = str(job.get("mode") or "snapshot")
    data["compress"] = str(job.get("compress") or "0")
    retention, todo = _retention(job)
    data["retention"] = Note(retention, todo) if todo else retention
    cron = calendar_to_cron(str(job.get("schedule") or "00:00"))
    data["schedule"] = cron or Note("0 1 * * *", "TODO: the Proxmox schedule "
                                    f"{job.get('schedule')!r} has no cron equivalent: set one")
    data["notes_template"] = str(job.get("notes-template") or "")
    data["enabled"] = Note(False, "TODO: decide who runs it (see above)")
    above += notes
    above += [
        "Proxmox runs it now, so labkeeper does not (enabled: false): `labkeeper vzdump run "
        f"{name}` still runs it on demand, verified.",
        "TODO: to let labkeeper run it on schedule (each archive verified, retention after "
        "verification, status and metrics), set enabled: true and disable the Proxmox job "
        f"(pvesh set /cluster/backup/{jid} --enabled 0); keeping both doubles the backups.",
    ]
    extra = sorted(k for k in job if k not in JOB_KEYS)
    if extra:
        above.append("not carried over from Proxmox: " + ", ".join(
            f"{k}={job[k]}" for k in extra))
    return _job_or_comment(data, above, sel, backup_storages)


def _job_or_comment(data: dict[str, Any], above: list[str], sel: Mapping[str, Any],
                    backup_storages: set[str]) -> Note:
    problem = ""
    if data["storage"] not in backup_storages:
        problem = f"its storage {data['storage']!r} holds no backups in the inventory"
    elif not sel:
        problem = "it selects no guest that exists"
    if not problem:
        return Note(data, above=tuple(above))
    body = ["not imported: " + problem + ". As it would read:"]
    body += emit([data])
    return Note(None, above=(*above, *body))


def jobs_section(facts: ClusterFacts, storages: Sequence[Any],
                  refused: Mapping[str, str]) -> list[Any]:
    vmids = {g.resource.vmid for g in facts.guests}
    backup = {s["name"] for s in storages if isinstance(s, Mapping) and "backup" in s["content"]}
    taken: set[str] = set()
    out: list[Any] = []
    for job in facts.backup_jobs:
        if str(job.get("type", "vzdump")) != "vzdump":
            continue
        name = unique_name(str(job.get("id", "job")), taken)
        note = describe_job(job, name=name, vmids=vmids, backup_storages=backup)
        if name in refused and note.value is not None:
            note = Note(None, above=(*note.above, f"not imported: {refused[name]}. As it "
                                     "would read:", *emit([note.value])))
        out.append(note)
    return out
