"""Reachability and credential checks for every part of the inventory.

Each check is a plain function taking the inventory and a target name; it
returns a :class:`CheckResult` or raises a typed labkeeper error (transient or
permanent). The Prefect tasks in ``tasks/doctor.py`` wrap them with timeouts
and retries; ``flows/doctor.py`` runs them all and publishes the table.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from typing import Literal

from labkeeper import b2, postgres, restic
from labkeeper.inventory import Inventory
from labkeeper.inventory import advice as inventory_warnings
from labkeeper.restic.repository import repo_for
from labkeeper.secrets import redact, resolve

Status = Literal["ok", "warn", "fail", "skip"]


@dataclass(frozen=True)
class CheckResult:
    check: str
    target: str
    status: Status
    latency_ms: int
    detail: str

    def row(self) -> dict[str, str | int]:
        d = asdict(self)
        d["detail"] = redact(str(d["detail"]))
        return d


@dataclass(frozen=True)
class CheckSpec:
    """One check to run: which function, on which target."""

    check: Literal["proxmox", "ssh", "database", "repository", "bucket", "config",
                   "restic", "pitr"]
    target: str


def plan_checks(inv: Inventory) -> list[CheckSpec]:
    """Every check the inventory calls for, in a stable order."""
    specs: list[CheckSpec] = [CheckSpec("proxmox", inv.proxmox.host)] if inv.proxmox else []
    specs += [CheckSpec("ssh", name) for name in sorted(inv.ssh_targets())]
    specs += [CheckSpec("database", db.name) for db in inv.databases]
    specs += [CheckSpec("repository", r.name) for r in inv.repositories]
    specs += [CheckSpec("bucket", r.name) for r in inv.repositories if r.s3 is not None]
    specs += [CheckSpec("restic", host) for host in restic_hosts(inv)]
    specs += [CheckSpec("pitr", s.name) for s in inv.pitr]
    specs += [CheckSpec("config", t) for t in dict.fromkeys(
        w.target for w in inventory_warnings.warning_items(inv))]
    return specs


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def check_database(inv: Inventory, name: str) -> CheckResult:
    started = time.monotonic()
    db = inv.database(name)
    from labkeeper import pg_backup, pg_container

    # The client that can dump this server (the container's own, or the installed
    # one matching its major version): none installed fails here, naming the package.
    conn = pg_container.matching(pg_backup.conn_for(inv, db))
    info = postgres.server_info(conn, timeout=30)
    client = conn.client.where or conn.client.bindir or "PATH"
    return CheckResult("database", name, "ok", _ms(started),
                       f"PostgreSQL {info.version}, {info.database_size / 1e6:.1f} MB, "
                       f"client: {client}")


def s3_target_for(inv: Inventory, name: str) -> b2.S3Target:
    r = inv.repository(name)
    if r.s3 is None:
        raise ValueError(f"repository {name} has no s3 settings")
    return b2.S3Target(endpoint=str(r.s3.endpoint), bucket=r.s3.bucket, region=r.s3.region,
                       access_key_id=resolve(r.s3.access_key_id),
                       secret_access_key=resolve(r.s3.secret_access_key),
                       ca_file=str(r.s3.ca_file) if r.s3.ca_file else None)


def check_repository(inv: Inventory, name: str) -> CheckResult:
    started = time.monotonic()
    repo = repo_for(inv, name)
    snaps = restic.snapshots(repo, timeout=120)
    newest = max((s.time for s in snaps), default=None)
    detail = f"{len(snaps)} snapshots"
    if newest:
        detail += f", newest {newest.isoformat(timespec='seconds')}"
    return CheckResult("repository", name, "ok", _ms(started), detail)


def check_bucket(inv: Inventory, name: str) -> CheckResult:
    started = time.monotonic()
    target = s3_target_for(inv, name)
    b2.head_bucket(target, timeout=20)
    return CheckResult("bucket", name, "ok", _ms(started),
                       f"bucket {target.bucket} at {target.endpoint} reachable")


def check_ssh(inv: Inventory, name: str) -> CheckResult:
    from labkeeper import ssh

    started = time.monotonic()
    target = ssh.SshTarget.from_spec(inv.ssh_targets()[name])
    with ssh.connect(target) as client:
        res = client.run(("uname", "-sr"), timeout=20)
    return CheckResult("ssh", name, "ok", _ms(started),
                       f"host key ok, login ok as {target.user}: {res.stdout.strip()}")


def check_proxmox(inv: Inventory, name: str) -> CheckResult:
    from labkeeper import proxmox

    started = time.monotonic()
    if inv.proxmox is None:
        return CheckResult("proxmox", name, "skip", 0, "not configured")
    api = proxmox.connect(inv.proxmox)
    ver = proxmox.version(api)
    nodes = proxmox.node_names(api)
    return CheckResult("proxmox", name, "ok", _ms(started),
                       f"Proxmox VE {ver}, nodes: {', '.join(nodes)}")


def check_config(inv: Inventory, target: str) -> CheckResult:
    """The inventory's warnings about ``target`` (:mod:`labkeeper.inventory.advice`:
    unverified TLS to PostgreSQL, plain HTTP to a repository) as a ``warn`` row."""
    found = [w.text for w in inventory_warnings.warning_items(inv) if w.target == target]
    if not found:
        return CheckResult("config", target, "ok", 0, "no warning")
    return CheckResult("config", target, "warn", 0, "; ".join(found))


LOCAL = "local"
"""The restic check's target for this machine (the controller's restic)."""


def restic_hosts(inv: Inventory) -> list[str]:
    """Every host that runs restic: this machine (when there is a repository), then
    each path-backup host."""
    hosts = [LOCAL] if inv.repositories else []
    return hosts + sorted({pb.host for pb in inv.path_backups})


def _restic_features(v: restic.ResticVersion) -> str:
    if v.exit_codes:
        return "exit codes 10-12, JSON errors, --retry-lock"
    if v.retry_lock:
        return "--retry-lock; fatal errors exit 1 (told apart by their message)"
    return "no --retry-lock; fatal errors exit 1 (told apart by their message)"


def check_restic(inv: Inventory, target: str) -> CheckResult:
    """The restic version on ``target``: :data:`LOCAL` (the restic labkeeper runs here:
    ``settings.restic_binary``, ``$LABKEEPER_RESTIC`` or ``restic`` on PATH), or a
    path-backup host over SSH (each distinct ``restic_binary`` of its path sets).
    Missing or older than :data:`labkeeper.path_backup.MIN_RESTIC`: fail, saying what
    to install."""
    from labkeeper import path_backup, ssh

    started = time.monotonic()
    if target == LOCAL:
        binary = inv.settings.restic_binary or restic.default_binary()
        v = restic.version_info(binary)
        if (v.major, v.minor, v.patch) < path_backup.MIN_RESTIC:
            return CheckResult("restic", target, "fail", _ms(started),
                               f"restic {v} is too old; {path_backup.INSTALL_HINT}")
        where = shutil.which(binary) or binary
        return CheckResult("restic", target, "ok", _ms(started),
                           f"restic {v} at {where} ({_restic_features(v)})")
    uses = sorted({(pb.restic_binary, pb.sudo) for pb in inv.path_backups
                   if pb.host == target})
    spec = ssh.SshTarget.from_spec(inv.ssh_targets()[target])
    found = []
    with ssh.connect(spec) as client:
        for binary, sudo in uses:
            version = path_backup.Remote(client, binary, {}, sudo).version()
            found.append(f"restic {version} ({binary}{', sudo' if sudo else ''})")
    return CheckResult("restic", target, "ok", _ms(started), "; ".join(found))


def check_pitr(inv: Inventory, name: str) -> CheckResult:
    """WAL archiving of one pitr server: slot, lag, newest WAL (labkeeper.pitr.lag)."""
    from labkeeper.pitr.lag import doctor_check

    return doctor_check(inv, name)


CHECKS = {
    "proxmox": check_proxmox,
    "ssh": check_ssh,
    "database": check_database,
    "repository": check_repository,
    "bucket": check_bucket,
    "config": check_config,
    "restic": check_restic,
    "pitr": check_pitr,
}


def run_check(inv: Inventory, spec: CheckSpec) -> CheckResult:
    return CHECKS[spec.check](inv, spec.target)
