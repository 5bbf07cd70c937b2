"""Is the restored guest copy up? The ``ssh`` and ``probe`` checks of a guest drill.

``ssh``: an SSH login (the guest's ssh settings) to ``drill.address``, the copy's
address on the isolated drill bridge. ``probe``: the drill's http / tcp / command
probe against the copy. Both are retried until the boot deadline (an authentication
or host-key refusal is not). Without a bridge, or without ``address`` where one is
needed, the check *fails*: it is never silently downgraded to ``status``, and the
guest's own address is never used (it would reach the original, not the copy).
"""

from __future__ import annotations

import logging
import time

from labkeeper import health
from labkeeper.drill.result import DrillResult
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import Guest, GuestDrill, GuestSsh, Inventory, SshTargetSpec
from labkeeper.ssh import SshTarget, connect

logger = logging.getLogger(__name__)

# =====================================================================================
# pure parts
# =====================================================================================


def check_label(spec: GuestDrill) -> str:
    if spec.check == "probe" and spec.probe is not None:
        return f"probe {health.probe_name(spec.probe)}"
    return spec.check


def reach_problem(spec: GuestDrill, bridge: str | None) -> str | None:
    """Why an ``ssh`` / ``probe`` check cannot reach the restored copy, or None."""
    if spec.check == "status":
        return None
    probe = spec.probe
    if probe is not None and probe.http is not None:
        needs_address = False
    elif probe is not None and probe.tcp is not None:
        needs_address = probe.tcp.host is None
    else:
        needs_address = True  # ssh, command probe
    if bridge is None:
        return ("the restored copy's network is detached (drills.guests.bridge is not "
                "set), so nothing can reach it: set an isolated bridge the worker can "
                "reach and guests[].drill.address, or use check: status")
    if needs_address and spec.address is None:
        return ("guests[].drill.address is not set: it is the copy's address on the drill "
                "bridge (the guest's own address would reach the original guest, not the "
                "copy)")
    return None


def copy_ssh_target(inv: Inventory, guest: Guest, address: str) -> SshTarget:
    """The SSH target of the restored copy: the guest's ssh settings (merged with the
    defaults) at the drill ``address``."""
    d = inv.ssh
    s = guest.ssh or GuestSsh()
    spec = SshTargetSpec(
        name=f"{guest.name} (drill copy)", kind="guest", address=address,
        port=s.port or d.port, user=s.user or d.user, key=s.key or d.key,
        known_hosts=inv.known_hosts_path(),
        trust_on_first_use=(d.trust_on_first_use if s.trust_on_first_use is None
                            else s.trust_on_first_use),
        host_key=s.host_key, connect_timeout=s.connect_timeout or d.connect_timeout,
        command_timeout=d.command_timeout)
    return SshTarget.from_spec(spec)


# =====================================================================================
# the checks (side effects)
# =====================================================================================


def _ssh_attempt(inv: Inventory, guest: Guest, spec: GuestDrill) -> tuple[bool, str, bool]:
    """One SSH login to the copy: (ok, detail, worth retrying)."""
    assert spec.address is not None
    target = copy_ssh_target(inv, guest, spec.address)
    where = f"{target.user}@{target.host}:{target.port}"
    try:
        with connect(target) as client:
            res = client.run(("uname", "-n"), timeout=target.connect_timeout + 20,
                             check=False)
    except LabkeeperError as exc:
        return False, f"SSH login {where} failed: {exc}", exc.transient
    if res.returncode != 0:
        return False, f"SSH login {where} ok but `uname -n` exited {res.returncode}", True
    return True, f"SSH login {where} ok (uname -n: {res.stdout.strip()[:64]})", False


def _probe_attempt(inv: Inventory, guest: Guest, spec: GuestDrill) -> tuple[bool, str, bool]:
    """One run of the drill's probe against the copy: (ok, detail, worth retrying)."""
    probe = spec.probe
    assert probe is not None
    if probe.http is not None:
        ok, detail = health.http_check(probe.http, probe.timeout)
        return ok, detail, True
    if probe.tcp is not None:
        host = probe.tcp.host or spec.address
        assert host is not None
        ok, detail = health.tcp_check(host, probe.tcp.port, probe.timeout)
        return ok, detail, True
    assert probe.command is not None and spec.address is not None
    target = copy_ssh_target(inv, guest, spec.address)
    try:
        with connect(target) as client:
            ok, detail = health.command_check(lambda: client, probe.command, probe.timeout)
    except LabkeeperError as exc:
        return False, f"SSH to {target.host}:{target.port} failed: {exc}", exc.transient
    return ok, f"{detail} on {target.host}:{target.port}", True


def reach_copy(inv: Inventory, guest: Guest, spec: GuestDrill, result: DrillResult, *,
               deadline: float, poll: float) -> None:
    """The ``ssh`` / ``probe`` check, retried until the boot deadline."""
    label = check_label(spec)
    why = reach_problem(spec, inv.drills.guests.bridge)
    if why is not None:
        result.check(label, False, why)
        return
    attempt = _ssh_attempt if spec.check == "ssh" else _probe_attempt
    tries = 0
    while True:
        tries += 1
        ok, detail, again = attempt(inv, guest, spec)
        if ok or not again or time.monotonic() >= deadline:
            break
        time.sleep(poll)
    result.check(label, ok, f"{detail} (attempt {tries})")
    logger.info("%s: %s: %s — %s", guest.name, label, "ok" if ok else "FAILED", detail)
