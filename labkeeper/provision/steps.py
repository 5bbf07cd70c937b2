"""What every provisioning step shares: its result row and the checks it makes first.

Each step re-reads the state it acts on and changes only what differs (check, then
change), so a rerun after a crash at any point converges. A guest is touched only
when it is ours: the managed tag, and the inventory's type and node.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from labkeeper import proxmox as px
from labkeeper.inventory import Guest, Inventory
from labkeeper.provision.errors import ProvisionError, VmidTaken
from labkeeper.secrets import redact

StepStatus = Literal["changed", "unchanged", "ok", "held", "skipped", "failed", "cleanup"]


@dataclass(frozen=True)
class StepResult:
    """What one step did to one guest (a row of the run's table)."""

    guest: str
    step: str
    status: StepStatus
    detail: str = ""
    seconds: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"guest": self.guest, "step": self.step, "status": self.status,
                "seconds": round(self.seconds, 2), "detail": redact(self.detail)}


def wait_task(api: Any, upid: px.Upid, inv: Inventory, timeout: float | None = None
              ) -> px.TaskResult:
    assert inv.proxmox is not None
    return px.wait_for_task(api, upid, timeout=timeout or inv.proxmox.task_timeout,
                            poll=0.05, max_poll=2.0)


def lookup(api: Any, guest: Guest) -> px.Guest | None:
    return px.find_guest(api, guest.vmid)


def is_ours(found: px.Guest, guest: Guest, managed_tag: str) -> bool:
    return managed_tag in found.tags and found.type == guest.type and found.node == guest.node


def read_guest(api: Any, guest: Guest) -> tuple[px.Guest | None, dict[str, Any]]:
    found = lookup(api, guest)
    if found is None:
        return None, {}
    return found, px.guest_config(api, found.node, found.vmid, found.type).values


def check_ours(found: px.Guest | None, guest: Guest, managed: str, step: str) -> px.Guest:
    if found is None:
        raise ProvisionError(f"{guest.name}: {step}: guest {guest.vmid} does not exist")
    if not is_ours(found, guest, managed):
        raise VmidTaken(f"{guest.name}: {step}: {found.type} {guest.vmid} on {found.node} "
                        f"is not labkeeper's (no {managed!r} tag); not touched")
    return found


def stop_and_destroy(api: Any, inv: Inventory, found: px.Guest) -> None:
    if found.status == "running":
        wait_task(api, px.stop_guest(api, found.node, found.vmid, found.type), inv)
    wait_task(api, px.destroy_guest(api, found.node, found.vmid, found.type), inv)
