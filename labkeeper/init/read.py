"""Reading the lab for ``labkeeper init`` (GET requests and one SELECT), and the
least-privilege Proxmox token it needs (:func:`token_commands`, from
:data:`labkeeper.proxmox.REQUIRED_PRIVILEGES`; the admin guide shows the same)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from labkeeper import proxmox as px
from labkeeper.init.model import ClusterFacts, GuestFacts, PgServer, StorageFacts
from labkeeper.init.values import as_int


def token_commands(user: str = "labkeeper@pve", name: str = "automation",
                   role: str = "LabKeeper") -> list[str]:
    """The least-privilege role, user and token, as ``pveum`` commands (pure)."""
    privs = " ".join(px.REQUIRED_PRIVILEGES)
    return [
        f'pveum role add {role} --privs "{privs}"',
        f"pveum user add {user}",
        f"pveum aclmod / --users {user} --roles {role}",
        f"pveum user token add {user} {name} --privsep 1",
        f"pveum aclmod / --tokens '{user}!{name}' --roles {role}",
    ]


def read_cluster(api: Any) -> ClusterFacts:
    """What init needs from the cluster, with GET requests only."""
    nodes = tuple(sorted(px.node_names(api)))
    resources = px.list_guests(api)
    guests = tuple(GuestFacts(r, px.guest_config(api, r.node, r.vmid, r.type).values)
                   for r in resources)
    storages = storages_of(px.send(api, px.resources_request("storage")) or [])
    templates: dict[str, tuple[str, ...]] = {}
    for node in nodes:
        vols: list[str] = []
        for s in storages:
            if "vztmpl" in s.content and node in s.nodes:
                vols += [v.volid for v in px.storage_content(api, node, s.name,
                                                             content="vztmpl")]
        templates[node] = tuple(sorted(vols))
    jobs = tuple(dict(j) for j in px.send(api, px.backup_jobs_request()) or [])
    return ClusterFacts(nodes, guests, storages, templates, jobs)


def storages_of(resources: Iterable[Mapping[str, Any]]) -> tuple[StorageFacts, ...]:
    """Storages from ``/cluster/resources?type=storage`` (one entry per node) (pure)."""
    by_name: dict[str, dict[str, Any]] = {}
    for r in resources:
        if r.get("type") != "storage":
            continue
        entry = by_name.setdefault(str(r["storage"]), {
            "type": str(r.get("plugintype", "")), "content": set(), "nodes": set(),
            "shared": bool(as_int(r.get("shared", 0)))})
        entry["content"].update(c for c in str(r.get("content", "")).split(",") if c)
        entry["nodes"].add(str(r.get("node", "")))
    return tuple(StorageFacts(name, e["type"], tuple(sorted(e["content"])),
                              tuple(sorted(e["nodes"])), e["shared"])
                 for name, e in sorted(by_name.items()))


DATABASES_SQL = ("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
                 "AND datname <> 'postgres' AND datname NOT LIKE 'labkeeper\\_drill\\_%' "
                 "ORDER BY 1;")


def read_databases(server: PgServer) -> list[str]:
    """The server's databases (not templates, not ``postgres``, not drill scratch ones)."""
    from labkeeper import postgres
    from labkeeper.secrets import resolve

    password = resolve(server.password) if server.password else None
    conn = postgres.Conn(server.host, server.port, "postgres", server.user, password=password)
    return [row[0] for row in postgres.query(conn, DATABASES_SQL) if row]
