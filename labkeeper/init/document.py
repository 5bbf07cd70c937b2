"""The whole inventory document ``labkeeper init`` writes (pure): header, lab, proxmox
(storages), guests, vzdump jobs, drills, and a repository placeholder with the databases;
then validated as every inventory is, a refused job turned into a comment saying why."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from labkeeper.init.guests import guest_entries
from labkeeper.init.jobs import jobs_section
from labkeeper.init.model import ClusterFacts, InitOptions, PgServer
from labkeeper.init.values import unique_name
from labkeeper.init.yamltext import Note, emit, unwrap
from labkeeper.inventory import Inventory, parse_inventory, validate_text

DEFAULT_REPOSITORY = "main"
STORAGE_TYPES = frozenset({"dir", "lvmthin", "lvm", "zfspool", "nfs", "cifs", "pbs", "cephfs",
                           "rbd", "btrfs", "glusterfs", "iscsi", "zfs"})
STORAGE_CONTENT = ("images", "rootdir", "vztmpl", "backup", "iso", "snippets", "import")


def _storage_section(facts: ClusterFacts) -> tuple[list[Any], set[str]]:
    out: list[Any] = []
    declared: set[str] = set()
    for s in facts.storages:
        content = [c for c in STORAGE_CONTENT if c in s.content]
        if s.type not in STORAGE_TYPES or not content:
            why = (f"type {s.type}" if s.type not in STORAGE_TYPES
                   else f"content {','.join(s.content) or 'none'}")
            out.append(Note(None, above=(f"storage {s.name} left out: its {why} is not "
                                         "modelled",)))
            continue
        entry: dict[str, Any] = {"name": s.name, "type": s.type, "content": content}
        if s.shared:
            entry["shared"] = True
        if set(s.nodes) != set(facts.nodes):
            entry["nodes"] = sorted(s.nodes)
        out.append(entry)
        declared.add(s.name)
    return out, declared


def _header(opts: InitOptions, facts: ClusterFacts | None) -> list[str]:
    lines = ["# labkeeper inventory, written by `labkeeper init`.",
             "# Check it with `labkeeper validate FILE`. Secrets are references only",
             "# (env:NAME, file:/path, prefect-block:NAME), never values.",
             "# Lines with TODO need a person's decision."]
    if facts is not None:
        lines.append(f"# Read from Proxmox at {opts.proxmox_host}: {len(facts.nodes)} node(s), "
                     f"{len(facts.guests)} guest(s), {len(facts.backup_jobs)} backup job(s).")
    else:
        lines.append("# Database backups only: no Proxmox, no SSH needed.")
    return lines


def _lab(opts: InitOptions) -> dict[str, Any]:
    why = "TODO: your time zone (schedules run in it"
    why += "; Proxmox job schedules were in the nodes' time zone)" if opts.proxmox_host else ")"
    return {"name": opts.lab_name, "timezone": Note("UTC", why)}


def _proxmox(opts: InitOptions, facts: ClusterFacts, storages: list[Any]) -> dict[str, Any]:
    tls: dict[str, Any] = {}
    if opts.fingerprint:
        tls["fingerprint"] = opts.fingerprint
    if opts.ca_file:
        tls["ca_file"] = opts.ca_file
    section: dict[str, Any] = {
        "host": opts.proxmox_host, "port": opts.proxmox_port, "token_id": opts.token_id,
        "token_secret": Note(opts.token_secret, "a reference, never the secret"),
    }
    if tls:
        section["tls"] = tls
    else:
        section["tls"] = Note({}, "verified against the system CAs; with PVE's self-signed "
                                  "certificate set ca_file or fingerprint")
    section["nodes"] = Note([{"name": n} for n in facts.nodes],
                            above=("TODO: give each node an address (SSH, for off-site "
                                   "copies of vzdump archives)",))
    section["storages"] = _section(storages)
    return section


def _repositories(opts: InitOptions) -> list[Any]:
    url = opts.repository_url or f"/var/backups/restic/{opts.lab_name}"
    return [Note({
        "name": DEFAULT_REPOSITORY,
        "url": Note(url, "TODO: where backups go; off-site: b2:BUCKET:path or "
                         "s3:https://ENDPOINT/BUCKET/path (with an s3 section)"),
        "password": Note(opts.repository_password,
                         "TODO: create this file (mode 0600) with the restic password"),
    }, above=("Repository placeholder: a local path works to start.",))]


def _databases(opts: InitOptions, names: Sequence[str]) -> list[Any]:
    pg = opts.postgres or PgServer("127.0.0.1", 5432, "postgres",
                                   "file:/etc/labkeeper/pg-password")
    out: list[Any] = []
    taken: set[str] = set()
    for dbname in names or ("app",):
        name = unique_name(dbname, taken)
        entry: dict[str, Any] = {"name": name}
        if name != dbname:
            entry["dbname"] = dbname
        entry.update({"host": pg.host, "port": pg.port, "user": pg.user})
        if pg.password:
            entry["password"] = Note(pg.password, "a reference, never the password")
        entry["repository"] = Note(DEFAULT_REPOSITORY, "the placeholder repository above")
        out.append(entry)
    if not names:
        out[0] = Note(out[0], above=("TODO: an example: name your database, its server and "
                                     "the backup user (one that may read every table)",))
    return out


def _drills(facts: ClusterFacts) -> dict[str, Any] | None:
    vmids = {g.resource.vmid for g in facts.guests}
    if not any(9900 <= v <= 9999 for v in vmids):
        return None
    first = (max(vmids) // 100 + 1) * 100
    return {"guests": {"scratch_vmids": Note({"first": first, "last": first + 99},
                                             "free vmids where guest drills restore copies")}}


def render_inventory(opts: InitOptions, facts: ClusterFacts | None = None,
                     databases: Sequence[str] = (), *,
                     refused_jobs: Mapping[str, str] | None = None) -> str:
    """The commented inventory text (pure). ``refused_jobs``: job name → why it is
    written as a comment only."""
    doc: dict[str, Any] = {"version": 1, "lab": _lab(opts)}
    if facts is not None:
        storages, declared = _storage_section(facts)
        doc["proxmox"] = _proxmox(opts, facts, storages)
        guests = guest_entries(facts, opts, declared)
        doc["guests"] = Note(guests, above=(
            "Every guest Proxmox has. `labkeeper provision plan` on this file changes "
            "nothing;", "guests with managed: false are never created, changed or destroyed."))
        jobs = jobs_section(facts, storages, refused_jobs or {})
        if jobs:
            doc["vzdump_jobs"] = _section(jobs)
        drills = _drills(facts)
        if drills:
            doc["drills"] = drills
    if facts is None or databases or opts.postgres is not None:
        doc["repositories"] = _repositories(opts)
        doc["databases"] = _databases(opts, databases)
    lines = [*_header(opts, facts), "", *emit(doc)]
    return "\n".join(_drop_empty(lines)) + "\n"


def _section(items: list[Any]) -> Any:
    """A list whose entries may all be comments (nothing imported) becomes ``[]``."""
    if any(unwrap(i)[0] is not None for i in items):
        return items
    return Note([], above=tuple(c for i in items for c in unwrap(i)[2]))


def _drop_empty(lines: list[str]) -> list[str]:
    """A list item that is only comments (a job not imported) leaves ``- null``: drop it."""
    return [line for line in lines if line.strip() != "- null"]


def render_valid(opts: InitOptions, facts: ClusterFacts | None = None,
                 databases: Sequence[str] = ()) -> str:
    """:func:`render_inventory`, with a job the inventory refuses (a storage missing on
    its node...) turned into a comment that says why (pure)."""
    text = render_inventory(opts, facts, databases)
    doc = yaml.safe_load(text)
    refused: dict[str, str] = {}
    for problem in validate_text(text):
        loc = problem.loc
        if len(loc) > 1 and loc[0] == "vzdump_jobs" and isinstance(loc[1], int):
            name = doc["vzdump_jobs"][loc[1]]["name"]
            refused.setdefault(name, f"{problem.path}: {problem.message}")
    if not refused:
        return text
    return render_inventory(opts, facts, databases, refused_jobs=refused)


def validate_rendered(text: str, filename: str) -> Inventory:
    """The rendered text, parsed and validated as every inventory is."""
    return parse_inventory(text, filename)


def summary(inv: Inventory) -> str:
    managed = sum(1 for g in inv.guests if g.managed)
    return (f"{len(inv.guests)} guest(s) ({managed} managed, {len(inv.guests) - managed} "
            f"managed: false), {len(inv.vzdump_jobs)} vzdump job(s), "
            f"{len(inv.databases)} database(s)")
