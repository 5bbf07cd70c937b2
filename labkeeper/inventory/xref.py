"""Common ground of the cross-reference checks: the view they run on and the report.

The checks run on a *view*: the items that validated (so a bad item is reported once,
by the schema) and the names the document declares (so an item that failed validation
does not also cause "unknown X" errors elsewhere). Each section module checks the
references out of its own items, and offers the checks other sections use to point
into it; ``root.cross_reference`` runs them in a fixed order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

from labkeeper.inventory.base import _did_you_mean
from labkeeper.yaml_loader import format_path

if TYPE_CHECKING:
    from labkeeper.inventory.apps import App
    from labkeeper.inventory.databases import Database
    from labkeeper.inventory.drills import Drills
    from labkeeper.inventory.guests import Guest
    from labkeeper.inventory.hosts import Host, SshDefaults
    from labkeeper.inventory.path_backups import PathBackup
    from labkeeper.inventory.proxmox import Proxmox, Storage
    from labkeeper.inventory.repositories import Repository
    from labkeeper.inventory.roles import Role
    from labkeeper.inventory.vzdump import VzdumpJob

Loc = tuple[str | int, ...]


@dataclass
class View:
    proxmox: Proxmox | None = None
    ssh: SshDefaults | None = None
    hosts: list[tuple[int, Host]] = field(default_factory=list)
    guests: list[tuple[int, Guest]] = field(default_factory=list)
    roles: dict[str, Role] = field(default_factory=dict)
    databases: list[tuple[int, Database]] = field(default_factory=list)
    repositories: list[tuple[int, Repository]] = field(default_factory=list)
    vzdump_jobs: list[tuple[int, VzdumpJob]] = field(default_factory=list)
    apps: list[tuple[int, App]] = field(default_factory=list)
    path_backups: list[tuple[int, PathBackup]] = field(default_factory=list)
    drills: Drills | None = None
    storages: list[tuple[int, Storage]] = field(default_factory=list)
    known: dict[str, set[Any]] = field(default_factory=dict)
    has_proxmox: bool = False
    bad: set[Loc] = field(default_factory=set)
    """Locations of schema errors: checks under them are suppressed."""

    def bad_fields(self, loc: Loc) -> set[str | int]:
        """Names of the direct children of ``loc`` that failed validation."""
        n = len(loc)
        return {b[n] for b in self.bad if len(b) > n and b[:n] == loc}

    def suppressed(self, loc: Loc) -> bool:
        return any(loc[: len(b)] == b for b in self.bad)


def unknown(kind: str, value: str, known: Iterable[Any], where: str = "") -> str:
    names = sorted(str(k) for k in known)
    hint = _did_you_mean(value, names)
    place = f" in {where}" if where else ""
    return f"unknown {kind} {value!r}{place}{hint}"


class CrossCheck:
    """One run of the checks over a view: its indexes and the problems found so far.
    Fields that are None because they failed validation are skipped (the caller
    filters problems under invalid fields)."""

    def __init__(self, view: View) -> None:
        self.v = view
        self.known = view.known
        self.problems: list[tuple[Loc, str]] = []

    def add(self, loc: Loc, message: str) -> None:
        self.problems.append((loc, message))

    def unique(self, section: str, items: list[tuple[int, Any]], attr: str, what: str,
               prefix: Loc = ()) -> None:
        """Report every item whose ``attr`` repeats an earlier item's."""
        seen: dict[Any, int] = {}
        for i, item in items:
            value = getattr(item, attr)
            if value is None:
                continue
            if value in seen:
                first = format_path((*prefix, section, seen[value]))
                self.add((*prefix, section, i, attr),
                         f"duplicate {what} {value!r} (already used by {first})")
            else:
                seen[value] = i

    @cached_property
    def host_names(self) -> dict[str, int]:
        return {h.name: i for i, h in self.v.hosts if h.name is not None}

    @cached_property
    def ssh_names(self) -> set[str]:
        """Hosts, and present guests with an ssh section: every SSH target."""
        return set(self.host_names) | {g.name for _, g in self.v.guests
                                       if g.ssh is not None and g.state == "present"}

    @cached_property
    def storages(self) -> dict[str, Storage]:
        return {s.name: s for _, s in self.v.storages if s.name is not None}

    @cached_property
    def guests_by_name(self) -> dict[str, tuple[int, Guest]]:
        """Each guest name's first guest (the others are reported as duplicates)."""
        out: dict[str, tuple[int, Guest]] = {}
        for i, g in self.v.guests:
            if g.name is not None and g.name not in out:
                out[g.name] = (i, g)
        return out

    @property
    def default_key(self) -> str | None:
        return self.v.ssh.key if self.v.ssh is not None else None
