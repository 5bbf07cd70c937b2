"""Health probes (http, tcp, command, container health): an app's health gate after an
update, and the proof that a drill's restored guest came up."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from labkeeper.inventory.base import _exactly_one, _Model
from labkeeper.inventory.fields import AbsPath, Argv, HostAddr, HttpUrl, Port, Seconds


class HttpProbe(_Model):
    url: HttpUrl
    status: Annotated[int, Field(ge=100, le=599)] = 200
    body_contains: str | None = None
    verify_tls: bool = True
    ca_file: AbsPath | None = None
    method: Literal["GET", "HEAD"] = "GET"


class TcpProbe(_Model):
    host: HostAddr | None = None
    """Default: the app's guest address."""
    port: Port


class CommandProbe(_Model):
    """A command run over SSH on the app's guest."""

    argv: Argv
    expect_exit: Annotated[int, Field(ge=0, le=255)] = 0
    stdout_contains: str | None = None


class ContainerProbe(_Model):
    """Docker health of Compose services (all services with a healthcheck if empty)."""

    services: list[str] = []


class Probe(_Model):
    """One health probe: exactly one of http / tcp / command / container."""

    name: str | None = None
    http: HttpProbe | None = None
    tcp: TcpProbe | None = None
    command: CommandProbe | None = None
    container: ContainerProbe | None = None
    timeout: Seconds = 5

    @model_validator(mode="after")
    def _one(self) -> Probe:
        _exactly_one(self, ("http", "tcp", "command", "container"), "probe")
        return self

    @property
    def kind(self) -> str:
        for k in ("http", "tcp", "command", "container"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("unreachable: validated probe has a kind")
