"""Inventory section ``settings.sites``: where each job runs when labkeeper spans several machines.

A *site* is a place with its own Prefect worker (a Proxmox node, the NAS, an off-site
box): ``settings.sites`` names them and the work queue each one's worker polls (in the
``settings.work_pool`` pool); ``site:`` on a database, a path-backup set or a vzdump job
says where that job must run (its network view and its secrets are there);
``settings.default_site`` (default: the first site) takes everything else. Pure models
and look-ups; `deployments/serve.py` turns them into deployments on queues.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator

from labkeeper.inventory.base import _Model

if TYPE_CHECKING:
    from labkeeper.inventory import Inventory

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT_QUEUE = "default"
"""The pool's own queue: where deployments go while the inventory declares no site."""


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a site or queue name: lowercase letters, digits, "
                         "'-' and '_', starting with a letter or digit, at most 63 characters")
    return value


SiteName = Annotated[str, AfterValidator(_check_name)]


class Site(_Model):
    """One place with its own worker."""

    work_queue: SiteName | None = None
    """The queue this site's worker polls (``prefect worker start --pool homelab
    --work-queue <it>``); default: the site's name."""
    deployments: list[str] = []
    """Whole-lab deployments (doctor, backup-watch, repo-maintenance, ...) that run here
    instead of on the default site."""
    description: str = ""


Sites = dict[SiteName, Site]


def default_site(inv: Inventory) -> str | None:
    s = inv.settings
    return s.default_site or next(iter(s.sites), None)


def site_of(inv: Inventory, item: Any) -> str | None:
    """The site a database / path set / vzdump job runs on (None: no sites declared)."""
    return getattr(item, "site", None) or default_site(inv)


def queue_of(inv: Inventory, site: str | None) -> str:
    if site is None:
        return DEFAULT_QUEUE
    return inv.settings.sites[site].work_queue or site


def site_of_deployment(inv: Inventory, deployment: str) -> str | None:
    """The site of a whole-lab deployment: the one listing it, else the default site."""
    for name, site in inv.settings.sites.items():
        if deployment in site.deployments:
            return name
    return default_site(inv)


def site_of_queue(inv: Inventory, queue: str) -> str | None:
    for name in inv.settings.sites:
        if queue_of(inv, name) == queue:
            return name
    return None


def problems(inv: Inventory) -> list[str]:
    """Every reference to an undeclared site, and deployments claimed by two sites."""
    known = inv.settings.sites
    out: list[str] = []

    def check(where: str, site: str | None) -> None:
        if site is not None and site not in known:
            names = ", ".join(known) or "none declared"
            out.append(f"{where}: unknown site {site!r} (settings.sites: {names})")

    check("settings.default_site", inv.settings.default_site)
    for section in ("databases", "path_backups", "vzdump_jobs"):
        for i, item in enumerate(getattr(inv, section)):
            check(f"{section}[{i}].site", item.site)
    claimed: dict[str, str] = {}
    queues: dict[str, str] = {}
    for name, site in known.items():
        for dep in site.deployments:
            if dep in claimed:
                out.append(f"settings.sites.{name}.deployments: {dep!r} already runs on "
                           f"site {claimed[dep]!r}")
            claimed[dep] = name
        q = site.work_queue or name
        if q in queues:
            out.append(f"settings.sites.{name}.work_queue: {q!r} is also site "
                       f"{queues[q]!r}'s queue")
        queues[q] = name
    return out


def check(inv: Inventory) -> Inventory:
    """For Inventory's validator: raise with every site problem."""
    found = problems(inv)
    if found:
        raise ValueError("; ".join(found))
    return inv


def endpoints(inv: Inventory) -> list[tuple[str, str, int]]:
    """(what, host, port) of every network part the inventory names, for the per-site
    reachability check (which site's worker can reach what)."""
    from urllib.parse import urlsplit

    out: list[tuple[str, str, int]] = []
    if inv.proxmox is not None:
        out.append(("proxmox", inv.proxmox.host, inv.proxmox.port))
    for db in inv.databases:
        if db.container is None:
            host, port = inv.database_address(db)
            out.append((f"database:{db.name}", host, port))
    for repo in inv.repositories:
        if repo.s3 is not None:
            u = urlsplit(str(repo.s3.endpoint))
            out.append((f"repository:{repo.name}", u.hostname or "",
                        u.port or (443 if u.scheme == "https" else 80)))
    for h in inv.hosts:
        out.append((f"host:{h.name}", h.address, h.port or inv.ssh.port))
    return out
