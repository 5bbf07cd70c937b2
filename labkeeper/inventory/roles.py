"""Inventory section ``roles:``: what bootstrap installs on a guest over SSH (packages,
files, setup commands, a Docker Compose stack). Guests name their roles; that
reference is checked with the guests."""

from __future__ import annotations

from pydantic import model_validator

from labkeeper.inventory.base import _exactly_one, _Model
from labkeeper.inventory.fields import (
    AbsPath,
    Argv,
    DockerHost,
    EnvName,
    FileMode,
    GitRef,
    GitUrl,
    Name,
    PackageName,
    RelPath,
    Secret,
    UserName,
)


class RoleFile(_Model):
    """A file written on the guest. Exactly one of content / source / secret."""

    path: AbsPath
    content: str | None = None
    source: RelPath | None = None
    """A template in this repository (relative to the inventory file)."""
    secret: Secret | None = None
    """The whole file is a secret (written mode 0600 unless ``mode`` says otherwise)."""
    mode: FileMode | None = None
    owner: UserName = "root"
    group: UserName = "root"

    @model_validator(mode="after")
    def _one(self) -> RoleFile:
        _exactly_one(self, ("content", "source", "secret"), "file")
        return self


class ComposeStack(_Model):
    """A Docker Compose stack: where it lives on the guest and where it comes from."""

    dir: AbsPath
    project: Name | None = None
    """Compose project name; default: the directory's name."""
    file: RelPath = "compose.yaml"
    git_url: GitUrl | None = None
    git_ref: GitRef | None = None
    source: RelPath | None = None
    """A directory in this repository copied to ``dir`` (instead of git_url)."""
    docker_host: DockerHost | None = None
    """The engine's address when not the default socket (``docker --host``)."""
    environment: dict[EnvName, str] = {}
    """Plain ``.env`` entries."""
    secrets: dict[EnvName, Secret] = {}
    """``.env`` entries resolved from secret references (the file is written 0600)."""

    @model_validator(mode="after")
    def _src(self) -> ComposeStack:
        if self.git_url is not None and self.source is not None:
            raise ValueError("set git_url or source, not both")
        if self.git_ref is not None and self.git_url is None:
            raise ValueError("git_ref needs git_url")
        both = set(self.environment) & set(self.secrets)
        if both:
            raise ValueError(f"variables in both environment and secrets: {sorted(both)}")
        return self


class Role(_Model):
    description: str = ""
    packages: list[PackageName] = []
    files: list[RoleFile] = []
    commands: list[Argv] = []
    """Idempotent setup commands, as argv lists, run after packages and files."""
    compose: ComposeStack | None = None
