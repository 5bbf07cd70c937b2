"""Application updates with automatic rollback: the steps, without Prefect.

The runbook a person would follow for one app (``flows/update.py`` strings the
steps together as Prefect tasks):

1. **Preflight** — run the app's probes once; an app that is already unhealthy is
   not touched (unless forced). Outside the maintenance window: skip (unless forced).
2. **Protect** — back up the app's databases (``pg_backup``), then the strongest
   protection the guest allows (:meth:`Inventory.rollback_mode`): a Proxmox snapshot
   ``labkeeper-pre-update-<run>``, else a vzdump of the guest (notes name the run),
   or for ``compose-images`` the image IDs every service runs now. A journal entry
   (``<state_dir>/updates/<app>.json``) records the protection before anything changes.
3. **Record versions** — Compose: image per service (``ps``/``images`` JSON);
   apt: the packages that will change (``apt-get -s``); commands: the app's
   ``version`` command.
4. **Update** with the strategy; output streamed to the log.
5. **Gate** — the probes: initial delay, N healthy rounds in a row before the deadline.
6. **Roll back** when the update failed or the gate did not open: snapshot rollback,
   restore of the pre-update vzdump, or Compose pinned to the old image IDs; start the
   guest, prove health again.
7. **Clean up** on success: pre-update snapshots (and pre-update vzdump archives) beyond
   ``keep_snapshots`` are deleted, the journal entry is closed.

Crash safety: a journal entry still open at the start of the next run means the
previous run died after protecting; :func:`recover` re-checks health and keeps the
update (cleaning up) or rolls back to the recorded protection.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

from labkeeper import compose, health
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, LabkeeperError, PermanentError
from labkeeper.inventory import App, AppApt, Guest, Inventory, MaintenanceWindow
from labkeeper.secrets import redact
from labkeeper.ssh import SshClient, SshPool, SshTarget

PREFIX = "labkeeper-pre-update-"
Log = Callable[[str], object]
Mode = Literal["snapshot", "vzdump", "compose-images", "none"]
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class UpdateFailed(PermanentError):
    """An update command exited non-zero (the app is then rolled back)."""


class GateFailed(PermanentError):
    """Health did not come after the update (the app is then rolled back)."""


class RollbackFailed(PermanentError):
    """Rolling back did not work: the app needs a person."""


# =========================================================================== pure parts


def new_run_id(now: datetime | None = None) -> str:
    """``YYYYmmdd-HHMMSS`` (UTC): sortable, and a valid snapshot-name suffix."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M%S")


def snapshot_name(run_id: str) -> str:
    name = f"{PREFIX}{run_id}"
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,39}", name):
        raise ValueError(f"not a valid snapshot name: {name!r}")
    return name


def is_pre_update(name: str) -> bool:
    return name.startswith(PREFIX)


def stale_snapshots(snapshots: Sequence[px.Snapshot], keep: int,
                    *, spare: Sequence[str] = ()) -> list[str]:
    """Pre-update snapshots beyond the newest ``keep`` (oldest first); ``spare`` never."""
    ours = [s for s in snapshots if is_pre_update(s.name)]
    ours.sort(key=lambda s: (s.snaptime or 0, s.name), reverse=True)
    return [s.name for s in reversed(ours[keep:]) if s.name not in spare]


def stale_archives(volumes: Sequence[px.StorageVolume], keep: int,
                   *, spare: Sequence[str] = ()) -> list[str]:
    """Pre-update vzdump archives (notes start with the prefix) beyond ``keep``."""
    ours = [v for v in volumes if v.notes.startswith(PREFIX)]
    ours.sort(key=lambda v: (v.ctime or 0, v.volid), reverse=True)
    return [v.volid for v in reversed(ours[keep:]) if v.volid not in spare]


def in_window(window: MaintenanceWindow | None, now: datetime, lab_timezone: str) -> bool:
    """Is ``now`` inside the window? ``end`` before ``start`` crosses midnight (the
    day that counts is the day the window opened)."""
    if window is None:
        return True
    local = now.astimezone(ZoneInfo(window.timezone or lab_timezone))
    start = _hhmm(window.start)
    end = _hhmm(window.end)
    t = (local.hour, local.minute)
    today = _WEEKDAYS[local.weekday()]
    yesterday = _WEEKDAYS[(local - timedelta(days=1)).weekday()]
    if start <= end:
        return today in window.days and start <= t < end
    return (t >= start and today in window.days) or (t < end and yesterday in window.days)


def _hhmm(text: str) -> tuple[int, int]:
    h, m = text.split(":")
    return int(h), int(m)


# --- apt ---------------------------------------------------------------------------------

APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "NEEDRESTART_MODE": "a"}
_DPKG_KEEP_CONFIG = ("-o", "Dpkg::Options::=--force-confdef",
                     "-o", "Dpkg::Options::=--force-confold")


def apt_update_argv() -> tuple[str, ...]:
    return ("apt-get", "-q", "update")


def apt_simulate_argv(cfg: AppApt) -> tuple[str, ...]:
    """What would change (no root needed, nothing changes)."""
    if cfg.packages:
        return ("apt-get", "-s", "-q", "install", "--only-upgrade", *cfg.packages)
    return ("apt-get", "-s", "-q", "full-upgrade")


def apt_upgrade_argv(cfg: AppApt) -> tuple[str, ...]:
    """Noninteractive upgrade keeping local config files; held packages stay held
    (apt-get never upgrades a package marked hold)."""
    if cfg.packages:
        return ("apt-get", "-y", "-q", *_DPKG_KEEP_CONFIG, "install", "--only-upgrade",
                *cfg.packages)
    return ("apt-get", "-y", "-q", *_DPKG_KEEP_CONFIG, "full-upgrade")


def apt_autoremove_argv() -> tuple[str, ...]:
    return ("apt-get", "-y", "-q", "autoremove")


def apt_steps(cfg: AppApt) -> list[tuple[str, ...]]:
    steps = [apt_update_argv(), apt_upgrade_argv(cfg)]
    if cfg.autoremove:
        steps.append(apt_autoremove_argv())
    return steps


_INST = re.compile(r"^Inst (?P<pkg>\S+)(?: \[(?P<old>[^\]]+)\])? \((?P<new>\S+)")


def parse_apt_simulation(text: str) -> dict[str, tuple[str, str]]:
    """``apt-get -s`` output → {package: (installed version or "", new version)}."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        m = _INST.match(line.strip())
        if m:
            out[m.group("pkg")] = (m.group("old") or "", m.group("new"))
    return out


def dpkg_query_argv(packages: Sequence[str]) -> tuple[str, ...]:
    return ("dpkg-query", "-W", "-f=${Package}\t${Version}\n", *packages)


def parse_dpkg_query(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        pkg, sep, version = line.partition("\t")
        if sep and pkg:
            out[pkg.split(":")[0]] = version.strip()
    return out


# --- the update plan ---------------------------------------------------------------------


def update_steps(app: App) -> list[tuple[str, ...]]:
    """Every command the update runs on the guest, in order."""
    if app.strategy == "compose":
        assert app.compose is not None
        return compose.update_steps(app.compose)
    if app.strategy == "apt":
        return apt_steps(app.apt or AppApt())
    assert app.commands is not None
    return [tuple(argv) for argv in app.commands.update]


# =========================================================================== records


@dataclass
class Protection:
    kind: Mode
    node: str
    vmid: int
    gtype: str
    snapshot: str | None = None
    volid: str | None = None
    images: dict[str, str] = field(default_factory=dict)
    """compose-images: service → image ID before the update."""
    databases: list[str] = field(default_factory=list)
    """Databases backed up before the update (backup ids)."""

    def text(self) -> str:
        if self.kind == "snapshot":
            return f"snapshot {self.snapshot}"
        if self.kind == "vzdump":
            return f"vzdump {self.volid}"
        if self.kind == "compose-images":
            return f"compose images of {len(self.images)} service(s)"
        return "none"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protection:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Journal:
    """What an unfinished update left behind (``<state_dir>/updates/<app>.json``)."""

    app: str
    run_id: str
    phase: Literal["protected", "updated", "rolling-back", "rolled-back", "rollback-failed"]
    protection: Protection
    before: dict[str, str] = field(default_factory=dict)
    attempted: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Journal:
        data = json.loads(text)
        data["protection"] = Protection.from_dict(data["protection"])
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def journal_path(inv: Inventory, app: str) -> Path:
    return inv.settings.state_dir / "updates" / f"{app}.json"


def read_journal(inv: Inventory, app: str) -> Journal | None:
    path = journal_path(inv, app)
    try:
        return Journal.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"update journal {path} is unreadable ({exc}); inspect and "
                          "remove it") from None


def write_journal(inv: Inventory, journal: Journal) -> None:
    path = journal_path(inv, journal.app)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(journal.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def close_journal(inv: Inventory, app: str) -> None:
    journal_path(inv, app).unlink(missing_ok=True)


# =========================================================================== side effects


class Session:
    """The Proxmox API and the SSH connection to an app's guest, opened on first use."""

    def __init__(self, inv: Inventory, app: App | str, *, log: Log = print,
                 api: Any = None) -> None:
        self.inv = inv
        self.app = inv.app(app) if isinstance(app, str) else app
        self.guest: Guest = inv.guest(self.app.guest)
        self.log = log
        self._api = api
        self._pool = SshPool()
        spec = inv.ssh_target(self.guest.name)
        self.target = SshTarget.from_spec(spec)
        self.command_timeout = float(spec.command_timeout)

    # -- resources
    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = px.connect_lab(self.inv.proxmox)
        return self._api

    def ssh(self) -> SshClient:
        return self._pool.get(self.target)

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def task_timeout(self) -> float:
        return float(self.inv.proxmox.task_timeout) if self.inv.proxmox else 3600.0

    @property
    def mode(self) -> Mode:
        return self.inv.rollback_mode(self.app)

    def wait(self, upid: Any) -> px.TaskResult:
        return px.wait_for_task(self.api, upid, timeout=self.task_timeout)

    def run(self, argv: Sequence[str], *, timeout: float | None = None,
            env: Mapping[str, str] | None = None, stream: bool = False) -> Any:
        def line(text: str) -> None:
            self.log(f"{self.app.name}| {text}")

        return self.ssh().run(argv, timeout=timeout or self.command_timeout, env=env,
                              check=False, on_stdout_line=line if stream else None,
                              on_stderr_line=line if stream else None)


# --- preflight -----------------------------------------------------------------------------


@dataclass
class Preflight:
    healthy: bool
    in_window: bool
    probes: list[health.ProbeResult]
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"healthy": self.healthy, "in_window": self.in_window, "reason": self.reason,
                "probes": [p.row() for p in self.probes]}


def preflight(s: Session, *, now: datetime | None = None) -> Preflight:
    """One round of probes and the maintenance window (read-only)."""
    inside = in_window(s.app.maintenance_window, now or datetime.now(UTC), s.inv.lab.timezone)
    probes = health.run_round(s.app, inv=s.inv, ssh=s.ssh)
    ok = health.round_ok(probes)
    reasons = []
    if not inside:
        w = s.app.maintenance_window
        assert w is not None
        reasons.append(f"outside the maintenance window ({','.join(w.days)} "
                       f"{w.start}-{w.end} {w.timezone or s.inv.lab.timezone})")
    if not ok:
        reasons.append(f"unhealthy before the update: {health.summary(probes)}")
    return Preflight(ok, inside, probes, "; ".join(reasons))


# --- versions -----------------------------------------------------------------------------


@dataclass
class Versions:
    values: dict[str, str] = field(default_factory=dict)
    image_ids: dict[str, str] = field(default_factory=dict)
    """compose: service → image ID (the pin for a compose-images rollback)."""
    planned: dict[str, str] = field(default_factory=dict)
    """apt: package → version the upgrade will install."""


def record_versions(s: Session) -> Versions:
    """What runs now (read-only)."""
    app = s.app
    if app.strategy == "compose":
        assert app.compose is not None
        ps = s.run(compose.ps_argv(app.compose), timeout=120)
        images = s.run(compose.images_argv(app.compose), timeout=120)
        if ps.returncode != 0:
            raise UpdateFailed(f"docker compose ps exited {ps.returncode}: "
                               f"{redact(ps.stderr.strip())[-300:]}")
        svc = compose.service_images(
            compose.parse_ps(ps.stdout),
            compose.parse_images(images.stdout) if images.returncode == 0 else [])
        return Versions({k: v.text() for k, v in svc.items()},
                        {k: v.image_id for k, v in svc.items() if v.image_id})
    if app.strategy == "apt":
        cfg = app.apt or AppApt()
        sim = s.run(apt_simulate_argv(cfg), timeout=600, env=APT_ENV)
        if sim.returncode != 0:
            raise UpdateFailed(f"apt-get -s exited {sim.returncode}: "
                               f"{redact(sim.stderr.strip())[-300:]}")
        changes = parse_apt_simulation(sim.stdout)
        return Versions({p: old or "(new)" for p, (old, _n) in changes.items()},
                        planned={p: new for p, (_o, new) in changes.items()})
    assert app.commands is not None
    if app.commands.version is None:
        return Versions()
    res = s.run(app.commands.version, timeout=120)
    text = res.stdout.strip().splitlines()[-1].strip() if res.stdout.strip() else ""
    return Versions({"version": text if res.returncode == 0 else f"? (exit {res.returncode})"})


def versions_after(s: Session, before: Mapping[str, str]) -> dict[str, str]:
    """The versions now, for the same keys as before (apt: the same packages)."""
    if s.app.strategy == "apt":
        if not before:
            return {}
        res = s.run(dpkg_query_argv(sorted(before)), timeout=120)
        return parse_dpkg_query(res.stdout)
    return record_versions(s).values


# --- protect ------------------------------------------------------------------------------


def vzdump_storage(inv: Inventory, app: App, guest: Guest) -> str:
    if app.vzdump_storage:
        return app.vzdump_storage
    if inv.proxmox is not None:
        for st in inv.proxmox.storages:
            if "backup" in st.content and st.available_on(guest.node):
                return st.name
    raise ConfigError(f"app {app.name}: no backup storage on node {guest.node} for the "
                      "pre-update vzdump (set vzdump_storage)")


def protect(s: Session, run_id: str, versions: Versions) -> Protection:
    """Take the protection the guest allows. Idempotent for one run id."""
    g = s.guest
    mode = s.mode
    prot = Protection(mode, g.node, g.vmid, g.type)
    if mode == "snapshot":
        name = snapshot_name(run_id)
        existing = {x.name for x in px.list_snapshots(s.api, g.node, g.vmid, g.type)}
        if name not in existing:
            s.log(f"{s.app.name}: snapshot {name} of {g.type} {g.vmid} on {g.node}")
            s.wait(px.create_snapshot(s.api, g.node, g.vmid, g.type, name))
        prot.snapshot = name
    elif mode == "vzdump":
        storage = vzdump_storage(s.inv, s.app, g)
        notes = f"{snapshot_name(run_id)} app={s.app.name}"
        volid = _find_archive(s, storage, notes)
        if volid is None:
            s.log(f"{s.app.name}: vzdump of {g.type} {g.vmid} to {storage} (no snapshots "
                  "on its storage)")
            s.wait(px.vzdump(s.api, g.node, vmids=[g.vmid], mode="snapshot", storage=storage,
                             notes_template=notes))
            volid = _find_archive(s, storage, notes)
        if volid is None:
            raise LabkeeperError(f"the pre-update vzdump of {g.vmid} is not on {storage}",
                                 transient=True)
        prot.volid = volid
    elif mode == "compose-images":
        if not versions.image_ids:
            raise UpdateFailed(f"{s.app.name}: no running image IDs to pin for a "
                               "compose-images rollback")
        prot.images = dict(versions.image_ids)
    return prot


def _find_archive(s: Session, storage: str, notes: str) -> str | None:
    for vol in px.backups(s.api, s.guest.node, storage, vmid=s.guest.vmid):
        if vol.notes.strip() == notes:
            return vol.volid
    return None


def protection_exists(s: Session, prot: Protection) -> bool:
    if prot.kind == "snapshot":
        names = {x.name for x in px.list_snapshots(s.api, prot.node, prot.vmid, prot.gtype)}
        return prot.snapshot in names
    if prot.kind == "vzdump":
        assert prot.volid is not None
        storage = px.storage_of(prot.volid)
        return any(v.volid == prot.volid
                   for v in px.backups(s.api, prot.node, storage, vmid=prot.vmid))
    return True


# --- update -------------------------------------------------------------------------------


def run_update(s: Session) -> list[str]:
    """Run the strategy's commands in order, streaming output; raise on the first failure."""
    env = APT_ENV if s.app.strategy == "apt" else None
    done: list[str] = []
    for argv in update_steps(s.app):
        shown = " ".join(argv)
        s.log(f"{s.app.name}: $ {redact(shown)}")
        res = s.run(argv, env=env, stream=True)
        if res.returncode != 0:
            tail = redact((res.stderr or res.stdout).strip())[-400:]
            raise UpdateFailed(f"{argv[0]} exited {res.returncode}"
                               f"{' (' + res.meaning + ')' if res.meaning else ''}: {tail}")
        done.append(shown)
    return done


# --- gate ---------------------------------------------------------------------------------


def gate(s: Session, *, sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> health.GateOutcome:
    if not s.app.health:
        s.log(f"{s.app.name}: no health probes declared: the gate cannot prove anything")
    return health.run_gate(lambda: health.run_round(s.app, inv=s.inv, ssh=s.ssh), s.app.gate,
                           clock=clock, sleep=sleep, log=lambda m: s.log(f"{s.app.name}: {m}"))


# --- rollback -----------------------------------------------------------------------------


def rollback(s: Session, prot: Protection) -> str:
    """Put the guest (or the Compose stack) back to the protection; start it."""
    node, vmid, gtype = prot.node, prot.vmid, prot.gtype
    if prot.kind == "snapshot":
        assert prot.snapshot is not None
        s.log(f"{s.app.name}: rolling {gtype} {vmid} back to snapshot {prot.snapshot}")
        s.wait(px.rollback_snapshot(s.api, node, vmid, gtype, prot.snapshot))
        _ensure_running(s, prot)
        s.close()  # the guest restarted: old SSH connections are gone
        return f"rolled back to snapshot {prot.snapshot}"
    if prot.kind == "vzdump":
        assert prot.volid is not None
        s.log(f"{s.app.name}: restoring {gtype} {vmid} from {prot.volid}")
        status = px.guest_status(s.api, node, vmid, gtype)  # type: ignore[arg-type]
        if status.status == "running":
            s.wait(px.stop_guest(s.api, node, vmid, gtype))  # type: ignore[arg-type]
        storage = s.guest.resources.storage
        if gtype == "lxc":
            s.wait(px.restore_lxc(s.api, node, vmid, prot.volid, storage=storage, force=True))
        else:
            s.wait(px.restore_qemu(s.api, node, vmid, prot.volid, storage=storage, force=True))
        _ensure_running(s, prot)
        s.close()
        return f"restored from {prot.volid}"
    if prot.kind == "compose-images":
        cfg = s.app.compose
        assert cfg is not None
        s.log(f"{s.app.name}: pinning {len(prot.images)} service(s) to their old images")
        s.ssh().put_text(compose.pin_override(prot.images),
                         f"{cfg.dir}/{compose.ROLLBACK_OVERRIDE}", mode=0o644)
        res = s.run(compose.rollback_up_argv(cfg), stream=True)
        if res.returncode != 0:
            raise RollbackFailed(f"docker compose up with the old images exited "
                                 f"{res.returncode}: {redact(res.stderr.strip())[-300:]}")
        return "compose services pinned to their previous image IDs"
    raise RollbackFailed(f"{s.app.name}: rollback is 'none': nothing to roll back to")


def _ensure_running(s: Session, prot: Protection) -> None:
    status = px.guest_status(s.api, prot.node, prot.vmid, prot.gtype)  # type: ignore[arg-type]
    if status.status != "running":
        s.wait(px.start_guest(s.api, prot.node, prot.vmid, prot.gtype))  # type: ignore[arg-type]


# --- cleanup ------------------------------------------------------------------------------


def cleanup(s: Session, keep: int | None = None) -> list[str]:
    """Delete pre-update snapshots / archives of this guest beyond ``keep``."""
    keep = s.app.keep_snapshots if keep is None else keep
    g = s.guest
    removed: list[str] = []
    snaps = px.list_snapshots(s.api, g.node, g.vmid, g.type)
    for name in stale_snapshots(snaps, keep):
        s.log(f"{s.app.name}: deleting old snapshot {name}")
        s.wait(px.delete_snapshot(s.api, g.node, g.vmid, g.type, name))
        removed.append(name)
    if s.mode == "vzdump":
        storage = vzdump_storage(s.inv, s.app, g)
        vols = px.backups(s.api, g.node, storage, vmid=g.vmid)
        for volid in stale_archives(vols, keep):
            s.log(f"{s.app.name}: deleting old pre-update archive {volid}")
            upid = px.delete_volume(s.api, g.node, volid)
            if upid is not None:
                s.wait(upid)
            removed.append(volid)
    return removed


# --- results ------------------------------------------------------------------------------

Status = Literal["updated", "rolled-back", "failed", "skipped", "dry-run", "recovered"]


@dataclass
class AppResult:
    app: str
    status: Status
    detail: str = ""
    protection: str = ""
    before: dict[str, str] = field(default_factory=dict)
    attempted: dict[str, str] = field(default_factory=dict)
    after: dict[str, str] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    run_id: str = ""
    plan: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"app": self.app, "status": self.status, "protection": self.protection,
                "before": fmt_versions(self.before), "attempted": fmt_versions(self.attempted),
                "after": fmt_versions(self.after), "removed": ", ".join(self.removed),
                "seconds": round(self.seconds, 2), "detail": redact(self.detail)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fmt_versions(values: Mapping[str, str]) -> str:
    if not values:
        return "-"
    if list(values) == ["version"]:
        return values["version"]
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items()))


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    start = time.monotonic()
    yield lambda: time.monotonic() - start
