"""Wait until a new guest answers SSH with the expected host key."""

from __future__ import annotations

import time
from collections.abc import Callable

from labkeeper.errors import HostKeyError, SSHError
from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.errors import GuestUnreachable
from labkeeper.provision.steps import StepResult


def wait_for_ssh(inv: Inventory, guest: Guest, *, timeout: float | None = None,
                 interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> StepResult:
    """Wait until the guest answers SSH with the expected host key (pinned, in
    known_hosts, or recorded on first contact when the inventory allows TOFU).

    A wrong host key fails at once; refused/unreachable/auth-not-yet is retried
    until ``timeout`` (default ``settings.provision.ssh_wait_timeout``).
    """
    from labkeeper import ssh

    spec = inv.ssh_targets().get(guest.name)
    if spec is None:
        return StepResult(guest.name, "wait-ssh", "skipped", "no ssh section")
    target = ssh.SshTarget.from_spec(spec)
    limit = timeout if timeout is not None else inv.settings.provision.ssh_wait_timeout
    started = clock()
    last: Exception | None = None
    attempts = 0
    while True:
        attempts += 1
        try:
            with ssh.connect(target) as client:
                client.run(("true",), timeout=30)
            return StepResult(guest.name, "wait-ssh", "ok",
                              f"{target.user}@{target.host}:{target.port} answered "
                              f"(attempt {attempts})", clock() - started)
        except HostKeyError as exc:
            raise GuestUnreachable(f"{guest.name}: {exc}") from None
        except SSHError as exc:
            last = exc
        remaining = started + limit - clock()
        if remaining <= 0:
            raise GuestUnreachable(
                f"{guest.name}: SSH on {target.host}:{target.port} did not answer within "
                f"{limit:g}s ({attempts} attempts; last error: {last})")
        sleep(min(interval, remaining))
