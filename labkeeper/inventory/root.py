"""The root model of the inventory: every section, look-ups by name, resolved SSH
targets, and the cross-reference checks run in one fixed order.

The checks live with their sections; this module only orders them. A model built
directly (``Inventory.model_validate``) runs them in its validator; the YAML loader
runs them itself, on a view of what validated, to report each with its line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationInfo, model_validator

from labkeeper.errors import ConfigError
from labkeeper.inventory import sites
from labkeeper.inventory.apps import App, check_app_names, check_apps
from labkeeper.inventory.base import _SKIP_XREF_KEY, _did_you_mean, _Model
from labkeeper.inventory.databases import (
    LOCAL_DRILL_SERVER,
    Database,
    check_database_names,
    check_databases,
)
from labkeeper.inventory.drills import (
    Drills,
    DrillServer,
    check_drill_server_names,
    check_drills,
)
from labkeeper.inventory.fields import Name
from labkeeper.inventory.guests import (
    Guest,
    check_dependency_cycles,
    check_guest_addresses,
    check_guest_names,
    check_guests,
)
from labkeeper.inventory.hosts import (
    Host,
    SshDefaults,
    SshTargetSpec,
    check_host_keys,
    check_host_names,
)
from labkeeper.inventory.notifications import Notifications
from labkeeper.inventory.path_backups import (
    PathBackup,
    check_path_backup_names,
    check_path_backups,
)
from labkeeper.inventory.pitr import PitrServer
from labkeeper.inventory.proxmox import (
    Node,
    Proxmox,
    Storage,
    check_proxmox_names,
    check_storage_nodes,
)
from labkeeper.inventory.repositories import Repository, Retention, check_repository_names
from labkeeper.inventory.roles import Role
from labkeeper.inventory.secret_walk import secret_values
from labkeeper.inventory.settings import Lab, Settings
from labkeeper.inventory.view import view_of_model
from labkeeper.inventory.vzdump import VzdumpJob, check_vzdump_job_names, check_vzdump_jobs
from labkeeper.inventory.xref import CrossCheck, Loc, View
from labkeeper.yaml_loader import format_path


class Inventory(_Model):
    version: Literal[1]
    lab: Lab
    settings: Settings = Settings()
    proxmox: Proxmox | None = None
    ssh: SshDefaults = SshDefaults()
    hosts: list[Host] = []
    guests: list[Guest] = []
    roles: dict[Name, Role] = {}
    databases: list[Database] = []
    repositories: list[Repository] = []
    vzdump_jobs: list[VzdumpJob] = []
    apps: list[App] = []
    path_backups: list[PathBackup] = []
    notifications: Notifications = Notifications()
    drills: Drills = Drills()
    pitr: list[PitrServer] = []

    @model_validator(mode="after")
    def _cross_references(self, info: ValidationInfo) -> Inventory:
        ctx = info.context
        sites.check(self)
        if isinstance(ctx, dict) and ctx.get(_SKIP_XREF_KEY):
            return self  # the loader checks them itself, with line numbers
        found = cross_reference(view_of_model(self))
        if found:
            raise ValueError(
                "; ".join(f"{format_path(loc)}: {message}" for loc, message in found)
            )
        return self

    # ---- look-ups ------------------------------------------------------------------

    def guest(self, name_or_vmid: str | int) -> Guest:
        for g in self.guests:
            if g.name == name_or_vmid or g.vmid == name_or_vmid:
                return g
        if isinstance(name_or_vmid, str) and name_or_vmid.isdigit():
            return self.guest(int(name_or_vmid))
        raise _not_found("guest", name_or_vmid, [g.name for g in self.guests])

    def host(self, name: str) -> Host:
        return _by_name(self.hosts, name, "host")

    def database(self, name: str) -> Database:
        return _by_name(self.databases, name, "database")

    def repository(self, name: str) -> Repository:
        return _by_name(self.repositories, name, "repository")

    def app(self, name: str) -> App:
        return _by_name(self.apps, name, "app")

    def vzdump_job(self, name: str) -> VzdumpJob:
        return _by_name(self.vzdump_jobs, name, "vzdump job")

    def path_backup(self, name: str) -> PathBackup:
        return _by_name(self.path_backups, name, "path backup")

    def node(self, name: str) -> Node:
        if self.proxmox is None:
            raise ConfigError("the inventory has no proxmox section")
        return _by_name(self.proxmox.nodes, name, "node")

    def storage(self, name: str) -> Storage:
        if self.proxmox is None:
            raise ConfigError("the inventory has no proxmox section")
        return _by_name(self.proxmox.storages, name, "storage")

    def role(self, name: str) -> Role:
        if name not in self.roles:
            raise _not_found("role", name, list(self.roles))
        return self.roles[name]

    def drill_server(self, name: str) -> DrillServer:
        for s in self.drills.servers:
            if s.name == name:
                return s
        if name == LOCAL_DRILL_SERVER:
            return DrillServer(name=LOCAL_DRILL_SERVER)
        raise _not_found("drill server", name, [s.name for s in self.drills.servers])

    def repository_for(self, item: Database | PathBackup) -> Repository:
        """The repository a database or path set backs up to (default: the only one)."""
        if item.repository is not None:
            return self.repository(item.repository)
        if len(self.repositories) == 1:
            return self.repositories[0]
        raise ConfigError(f"{item.name}: no repository named and not exactly one declared")

    def retention_for(self, item: Database | PathBackup) -> Retention:
        if isinstance(item, PathBackup) and item.retention is not None:
            return item.retention
        return self.repository_for(item).retention

    def database_address(self, db: Database | str) -> tuple[str, int]:
        """``(host, port)`` of a database, resolving ``guest:`` to the guest's address."""
        db = self.database(db) if isinstance(db, str) else db
        if db.container is not None:
            return db.container.pghost, db.port
        if db.host is not None:
            return db.host, db.port
        address = self.guest(db.guest or "").address
        if address is None:
            raise ConfigError(f"database {db.name}: guest {db.guest} has no address")
        return address, db.port

    def database_server(self, db: Database | str) -> str:
        """The server label used in backup tags (``db:<server>/<name>``)."""
        db = self.database(db) if isinstance(db, str) else db
        base = db.guest or db.host or "unknown"
        return f"{base}/{db.container.name}" if db.container is not None else base

    def rollback_mode(
        self, app: App | str
    ) -> Literal["snapshot", "vzdump", "compose-images", "none"]:
        """Resolve ``auto``: a snapshot when the guest's storage supports them, else vzdump."""
        app = self.app(app) if isinstance(app, str) else app
        if app.rollback != "auto":
            return app.rollback
        guest = self.guest(app.guest)
        storage = self.storage(guest.resources.storage)
        return "snapshot" if storage.supports_snapshots else "vzdump"

    def known_hosts_path(self) -> Path:
        return self.ssh.known_hosts or self.settings.known_hosts

    def ssh_targets(self) -> dict[str, SshTargetSpec]:
        """Every SSH target with defaults merged: each host, and each present guest
        that has an ``ssh`` section (address defaults to its first static IP)."""
        d = self.ssh
        known = self.known_hosts_path()
        out: dict[str, SshTargetSpec] = {}
        for h in self.hosts:
            out[h.name] = SshTargetSpec(
                name=h.name,
                kind="host",
                address=h.address,
                port=h.port or d.port,
                user=h.user or d.user,
                key=h.key or d.key,
                known_hosts=known,
                trust_on_first_use=_first(h.trust_on_first_use, d.trust_on_first_use),
                host_key=h.host_key,
                connect_timeout=h.connect_timeout or d.connect_timeout,
                command_timeout=d.command_timeout,
            )
        for g in self.guests:
            if g.ssh is None or g.state != "present" or g.address is None:
                continue
            s = g.ssh
            out[g.name] = SshTargetSpec(
                name=g.name,
                kind="guest",
                address=g.address,
                port=s.port or d.port,
                user=s.user or d.user,
                key=s.key or d.key,
                known_hosts=known,
                trust_on_first_use=_first(s.trust_on_first_use, d.trust_on_first_use),
                host_key=s.host_key,
                connect_timeout=s.connect_timeout or d.connect_timeout,
                command_timeout=d.command_timeout,
                vmid=g.vmid,
            )
        return out

    def ssh_target(self, name: str) -> SshTargetSpec:
        targets = self.ssh_targets()
        if name not in targets:
            raise _not_found("SSH target", name, list(targets))
        return targets[name]

    def secret_refs(self) -> list[str]:
        """Every secret reference in the inventory, in document order, without repeats."""
        seen: dict[str, None] = {}
        for ref in secret_values(self):
            seen.setdefault(ref, None)
        return list(seen)


def _first(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _by_name(items: Iterable[Any], name: str, kind: str) -> Any:
    items = list(items)
    for item in items:
        if item.name == name:
            return item
    raise _not_found(kind, name, [i.name for i in items])


def _not_found(kind: str, name: object, known: Sequence[str]) -> ConfigError:
    hint = _did_you_mean(str(name), known)
    listing = ", ".join(known) if known else "none declared"
    return ConfigError(f"no {kind} {name!r} in the inventory{hint} (known: {listing})")


# ---- cross-references ----------------------------------------------------------------

CHECKS: tuple[Callable[[CrossCheck], None], ...] = (
    # unique names and vmids first
    check_guest_names,
    check_host_names,
    check_database_names,
    check_repository_names,
    check_vzdump_job_names,
    check_app_names,
    check_path_backup_names,
    check_proxmox_names,
    check_drill_server_names,
    # then what each section names elsewhere
    check_guest_addresses,
    check_storage_nodes,
    check_guests,
    check_host_keys,
    check_dependency_cycles,
    check_databases,
    check_drills,
    check_vzdump_jobs,
    check_apps,
    check_path_backups,
)
"""Every cross-reference check, in the order their problems are reported."""


def cross_reference(view: View) -> list[tuple[Loc, str]]:
    """Every reference between parts of the inventory, checked."""
    x = CrossCheck(view)
    for check in CHECKS:
        check(x)
    return x.problems
