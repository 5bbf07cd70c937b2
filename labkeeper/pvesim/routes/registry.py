"""The route table: PVE path templates to handler functions, and the request context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from labkeeper.pvesim.perms import Principal

if TYPE_CHECKING:
    from labkeeper.pvesim.server import Simulator


@dataclass
class Ctx:
    """What a handler gets: the simulator, the caller (None on an endpoint open to the
    world, which then acts as root@pam) and the validated parameters."""

    sim: Simulator
    who: Principal | None
    p: dict[str, Any]

    @property
    def user(self) -> str:
        return self.who.userid if self.who else "root@pam"

    @property
    def principal(self) -> Principal:
        return self.who or Principal("root@pam")


Handler = Callable[[Ctx], Any]


ROUTES: dict[tuple[str, str], Handler] = {}


def route(method: str, *templates: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for template in templates:
            ROUTES[(method, template)] = fn
        return fn

    return deco
