"""Inventory section ``apps:``: applications updated with a health gate and automatic
rollback (Compose, apt or commands), in their maintenance window.

Also their cross-checks: the guest (with ssh), the databases backed up first, and a
rollback the guest's storage can provide.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import (
    AbsPath,
    Argv,
    Cron,
    DockerHost,
    GitUrl,
    GuestName,
    Name,
    NonNegInt,
    PackageName,
    RelPath,
    Seconds,
    StorageName,
    Tag,
    TimeOfDay,
    TimeZone,
)
from labkeeper.inventory.guests import Guest, check_guest_ref
from labkeeper.inventory.probes import Probe
from labkeeper.inventory.proxmox import check_storage
from labkeeper.inventory.xref import CrossCheck, unknown


class Gate(_Model):
    """Health gate after an update: wait ``initial_delay``, then require
    ``successes`` consecutive passing rounds before ``deadline`` (seconds)."""

    initial_delay: Annotated[float, Field(ge=0)] = 10
    interval: Seconds = 5
    deadline: Seconds = 300
    successes: Annotated[int, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _order(self) -> Gate:
        if self.initial_delay >= self.deadline:
            raise ValueError("initial_delay must be shorter than deadline")
        return self


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class MaintenanceWindow(_Model):
    """When updates may run; ``end`` before ``start`` crosses midnight."""

    days: list[Weekday] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    start: TimeOfDay
    end: TimeOfDay
    timezone: TimeZone | None = None
    """Default: lab.timezone."""


class AppCompose(_Model):
    dir: AbsPath
    project: Name | None = None
    file: RelPath = "compose.yaml"
    git_url: GitUrl | None = None
    docker_host: DockerHost | None = None
    """The engine's address when not the default socket (``docker --host``)."""
    pull: bool = True
    remove_orphans: bool = True


class AppApt(_Model):
    packages: list[PackageName] = []
    """Empty: full upgrade of the guest."""
    autoremove: bool = False


class AppCommands(_Model):
    update: list[Argv] = Field(min_length=1)
    version: Argv | None = None
    """Prints the installed version (recorded before/after)."""


class App(_Model):
    name: Name
    guest: GuestName
    strategy: Literal["compose", "apt", "commands"] = "compose"
    compose: AppCompose | None = None
    apt: AppApt | None = None
    commands: AppCommands | None = None
    health: list[Probe] = []
    gate: Gate = Gate()
    rollback: Literal["auto", "snapshot", "vzdump", "compose-images", "none"] = "auto"
    """auto: a guest snapshot when its storage supports snapshots, else a vzdump."""
    vzdump_storage: StorageName | None = None
    """Where pre-update vzdump backups go; default: the first backup storage on the node."""
    keep_snapshots: NonNegInt = 1
    maintenance_window: MaintenanceWindow | None = None
    databases: list[Name] = []
    """Backed up before every update."""
    tags: list[Tag] = []
    schedule: Cron | None = None
    """Update schedule; None: on demand only."""

    @model_validator(mode="after")
    def _strategy(self) -> App:
        block = {"compose": self.compose, "apt": self.apt, "commands": self.commands}
        if self.strategy in ("compose", "commands") and block[self.strategy] is None:
            raise ValueError(f"strategy {self.strategy} needs a {self.strategy} section")
        for other, value in block.items():
            if other != self.strategy and value is not None:
                raise ValueError(f"a {other} section does not fit strategy {self.strategy}")
        if self.rollback == "compose-images" and self.strategy != "compose":
            raise ValueError("rollback compose-images needs strategy compose")
        if any(p.container is not None for p in self.health) and self.strategy != "compose":
            raise ValueError("container probes need strategy compose")
        return self


# ---- cross-references ----------------------------------------------------------------


def check_app_names(x: CrossCheck) -> None:
    x.unique("apps", x.v.apps, "name", "app name")


def check_apps(x: CrossCheck) -> None:
    known = x.known
    for i, app in x.v.apps:
        g = check_guest_ref(x, ("apps", i, "guest"), app.guest, "ssh")
        for n, name in enumerate(app.databases or ()):
            if name not in known["database"]:
                x.add(("apps", i, "databases", n),
                      unknown("database", name, known["database"], "databases"))
        check_storage(x, ("apps", i, "vzdump_storage"), app.vzdump_storage,
                      g.node if g else None, "backup", "vzdump archives")
        if g is None or g.resources is None:
            continue
        _check_rollback(x, i, app, g)
        for p, probe in enumerate(app.health or ()):
            if probe.tcp is not None and probe.tcp.host is None and g.address is None:
                x.add(("apps", i, "health", p, "tcp", "host"),
                      f"guest {g.name!r} has no address: set host")


def _check_rollback(x: CrossCheck, i: int, app: App, g: Guest) -> None:
    """The rollback the app asks for fits the storage of its guest's root disk."""
    s = x.storages.get(g.resources.storage or "")
    if s is None or s.content is None or g.node is None:
        return
    if app.rollback == "snapshot" and not s.supports_snapshots:
        x.add(("apps", i, "rollback"),
              f"guest {g.name!r} is on storage {s.name!r}, which has no snapshots "
              "(use auto or vzdump)")
    needs_vzdump = app.rollback == "vzdump" or (
        app.rollback == "auto" and not s.supports_snapshots
    )
    if needs_vzdump and app.vzdump_storage is None and not any(
        st.content and "backup" in st.content and st.available_on(g.node)
        for st in x.storages.values()
    ):
        x.add(("apps", i, "rollback"),
              f"a vzdump rollback needs a backup storage on node {g.node!r}: "
              "declare one or set vzdump_storage")
