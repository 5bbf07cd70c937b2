"""Application updates with automatic rollback: the steps, without Prefect.

The runbook a person would follow for one app (``flows/update.py`` strings the
steps together as Prefect tasks):

1. **Preflight** — run the app's probes once; an app that is already unhealthy is
   not touched (unless forced). Outside the maintenance window: skip (unless forced).
2. **Record versions** — Compose: image, image ID and registry digest per service
   (``ps`` JSON, ``docker image inspect``); apt: the packages that will change
   (``apt-get -s``); commands: the app's ``version`` command.
3. **Fetch** (Compose) — ``docker compose pull`` *before* anything is protected or
   changed: a pull that fails (registry down, unknown tag) changes nothing (the tags
   it moved are put back) and is a transient error, never a rollback. Nothing new:
   the app is current. A digest that was rolled back before (the app's *pin*) is not
   deployed again: the app is *held*, loudly, until the registry offers another one.
4. **Protect** — back up the app's databases (``pg_backup``), then the strongest
   protection the guest allows (:meth:`Inventory.rollback_mode`): a Proxmox snapshot
   ``labkeeper-pre-update-<app>-<id>`` (a fresh random id: never an existing snapshot),
   else a vzdump of the guest (notes name the run; marked *protected* so no retention
   or prune deletes it while the update depends on it), or for ``compose-images``
   the images every service runs now, each checked to be on the guest (else pulled by
   its digest) and kept by a tag. A journal entry (``<state_dir>/updates/<app>.json``)
   records the protection before anything changes.
5. **Update** with the strategy; output streamed to the log.
6. **Gate** — the probes: initial delay, N healthy rounds in a row before the deadline.
7. **Roll back** when the update failed or the gate did not open: snapshot rollback,
   restore of the pre-update vzdump, or (Compose, every mode) the old images re-tagged
   onto the references the compose file names, so that any later ``up -d`` keeps
   them; start the guest, prove health again; the app is *pinned*
   (``<state_dir>/update-pins/<app>.json``, shown by ``status``) until a later good
   update.
8. **Clean up** on success: pre-update snapshots (and archives, unprotected first)
   beyond ``keep_snapshots`` are deleted, never one an open journal names; the
   journal entry is closed.

Exclusion: one update per *guest* at a time (snapshot, rollback and cleanup act on
the whole guest): an OS file lock (``flock``) in the state dir, which the kernel
releases when its holder dies, so a killed run never locks anyone out.

Crash safety: a journal entry still open at the start of the next run means the
previous run died after protecting; the flow re-checks health and keeps the update
(cleaning up) or rolls back — but only while the journal is recent (gate deadline
plus :data:`STALE_MARGIN`): an older one waits for a person.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
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
from labkeeper.errors import ConfigError, LabkeeperError, PermanentError, TransientError
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


class PullFailed(TransientError):
    """``docker compose pull`` failed (registry down, unknown tag): nothing changed."""


class GuestBusy(TransientError):
    """Another update holds the guest's lock."""


STALE_MARGIN = 600.0
"""Seconds beyond the gate's own time after which an unfinished update's journal is
*stale*: its run is long dead, the lab may have moved on (data written since), so no
automatic rollback to its protection; a person decides (``resolve``)."""


# =========================================================================== pure parts


def new_run_id(now: datetime | None = None, *, token: str | None = None) -> str:
    """``YYYYmmdd-HHMMSS-<8 random hex>`` (UTC): sortable, and unique even for two runs
    in the same second (the random part names the snapshot)."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{token or secrets.token_hex(4)}"


def snapshot_name(app: str, run_id: str) -> str:
    """``labkeeper-pre-update-<app>-<id>`` within PVE's 40 characters: the app (up to
    10 characters, for a person reading the list) and the run's random id (what makes
    it unique; the last 8 letters or digits of the run id)."""
    slug = re.sub(r"[^a-z0-9]", "", app.lower())[:10] or "app"
    uid = re.sub(r"[^a-z0-9]", "", run_id.lower())[-8:]
    name = f"{PREFIX}{slug}-{uid}"
    if not uid or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_\-]{0,39}", name):
        raise ValueError(f"not a valid snapshot name: {name!r}")
    return name


def archive_notes(app: str, run_id: str) -> str:
    """The notes of a pre-update vzdump archive (how cleanup and recovery find it)."""
    return f"{PREFIX}{run_id} app={app}"


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
    """Every command the update runs on the guest, in order (the plan a person reads)."""
    if app.strategy == "compose":
        assert app.compose is not None
        return compose.update_steps(app.compose)
    return apply_steps(app)


def fetches_first(app: App) -> bool:
    """Compose apps pull before anything is protected (git checkouts pull after their
    ``git pull``, inside the update)."""
    return app.strategy == "compose" and app.compose is not None and app.compose.pull \
        and not app.compose.git_url


def apply_steps(app: App) -> list[tuple[str, ...]]:
    """The commands that change the app, run after protecting."""
    if app.strategy == "compose":
        assert app.compose is not None
        if not fetches_first(app):
            return compose.update_steps(app.compose)
        return compose.in_transaction_steps(app.compose)
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
    """compose: service → image ID before the update (every rollback mode re-tags these
    onto ``refs`` afterwards, so that a later ``up -d`` keeps them)."""
    refs: dict[str, str] = field(default_factory=dict)
    """compose: service → the image reference its compose file names."""
    digests: dict[str, str] = field(default_factory=dict)
    """compose: service → registry digest of the image before the update ("" unknown):
    a rollback pulls ``repo@digest`` when the image is no longer on the guest."""
    databases: list[str] = field(default_factory=list)
    """Databases backed up before the update (backup ids)."""

    def text(self) -> str:
        if self.kind == "snapshot":
            return f"snapshot {self.snapshot}"
        if self.kind == "vzdump":
            return f"vzdump {self.volid}"
        if self.kind == "compose-images":
            shown = ", ".join(f"{svc}={_short(self.digests.get(svc) or iid)}"
                              for svc, iid in sorted(self.images.items()))
            return f"compose images {shown}"
        return "none"

    def names(self) -> set[str]:
        """The snapshot / archive this protection depends on (what cleanup spares)."""
        return {n for n in (self.snapshot, self.volid) if n}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Protection:
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


@dataclass
class Journal:
    """What an unfinished update left behind (``<state_dir>/updates/<app>.json``)."""

    app: str
    run_id: str
    phase: Literal["protecting", "protected", "updated", "rolling-back", "rolled-back",
                   "rollback-failed"]
    protection: Protection
    before: dict[str, str] = field(default_factory=dict)
    attempted: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    detail: str = ""
    touched: float = 0.0
    """When the journal was last written (each phase change): its age decides whether
    crash recovery may act on its own (:func:`is_stale`)."""
    offered: dict[str, str] = field(default_factory=dict)
    """compose: service → the digest the update deploys (remembered as bad on rollback)."""
    guest: str = ""

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


def open_journals(inv: Inventory) -> list[Journal]:
    """Every unfinished update of the lab (any app)."""
    folder = inv.settings.state_dir / "updates"
    found = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        journal = read_journal(inv, path.stem)
        if journal is not None:
            found.append(journal)
    return found


def spared_names(inv: Inventory, *, but: str | None = None) -> set[str]:
    """Snapshots and archives that open journals (of apps other than ``but``) name."""
    return set().union(*(j.protection.names() for j in open_journals(inv) if j.app != but))


def journal_age(journal: Journal, now: float | None = None) -> float:
    """Seconds since the journal was last written (unknown: infinitely old)."""
    last = journal.touched or journal.started
    return float("inf") if not last else max(0.0, (now or time.time()) - last)


def stale_after(app: App) -> float:
    """How old a journal may be for crash recovery to act on its own."""
    return app.gate.initial_delay + app.gate.deadline + STALE_MARGIN


def is_stale(journal: Journal, app: App, now: float | None = None) -> bool:
    return journal_age(journal, now) > stale_after(app)


def write_journal(inv: Inventory, journal: Journal) -> None:
    journal.touched = time.time()
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


def _atomic_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- the guest lock -------------------------------------------------------------------


def lock_path(inv: Inventory, guest: str) -> Path:
    return inv.settings.state_dir / "locks" / f"update-guest-{guest}.lock"


@contextlib.contextmanager
def guest_lock(inv: Inventory, guest: str, *, holder: str, timeout: float,
               poll: float = 0.2, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep) -> Iterator[None]:
    """Hold the guest's update lock (``flock``), waiting up to ``timeout`` seconds.

    The kernel drops the lock when the holding process dies, however it dies, so a
    killed run never locks the guest out (a lease in a server's database can outlive
    its holder). The file says who holds it, for the message of whoever waits."""
    path = lock_path(inv, guest)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = clock() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if clock() >= deadline:
                    raise GuestBusy(f"another update of guest {guest} is running "
                                    f"({_holder(fd) or 'holder unknown'}); waited "
                                    f"{timeout:g}s") from None
                sleep(poll)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"holder": holder, "pid": os.getpid(),
                                  "since": time.time()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return ""
    if not isinstance(data, dict) or not data.get("holder"):
        return ""
    since = datetime.fromtimestamp(float(data.get("since", 0)), UTC)
    return (f"{data['holder']}, pid {data.get('pid')}, since "
            f"{since.strftime('%Y-%m-%d %H:%M:%S')} UTC")


# --- pins: a rolled-back Compose app stays on its good images ------------------------


@dataclass
class Pin:
    """A Compose app rolled back to ``images``; ``bad`` are the digests that failed.

    While pinned, an update that finds the registry offering only bad digests holds
    the app (loudly) instead of deploying them again; a good update removes the pin."""

    app: str
    run_id: str
    since: float
    images: dict[str, str] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    bad: dict[str, list[str]] = field(default_factory=dict)
    """service → digests rolled back from (newest last)."""
    reason: str = ""

    def bad_digests(self) -> set[str]:
        return {d for ds in self.bad.values() for d in ds}

    def text(self) -> str:
        good = ", ".join(f"{svc}={_short(self.digests.get(svc) or iid)}"
                         for svc, iid in sorted(self.images.items()))
        bad = ", ".join(sorted(_short(d) for d in self.bad_digests())) or "-"
        return f"pinned to {good} since run {self.run_id}; not deploying {bad}"


def pin_path(inv: Inventory, app: str) -> Path:
    return inv.settings.state_dir / "update-pins" / f"{app}.json"


def read_pin(inv: Inventory, app: str) -> Pin | None:
    path = pin_path(inv, app)
    try:
        data = json.loads(path.read_text())
        return Pin(**{k: v for k, v in data.items() if k in Pin.__dataclass_fields__})
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"update pin {path} is unreadable ({exc}); inspect and remove "
                          "it") from None


def write_pin(inv: Inventory, pin: Pin) -> None:
    _atomic_json(pin_path(inv, pin.app), asdict(pin))


def clear_pin(inv: Inventory, app: str) -> bool:
    path = pin_path(inv, app)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return existed


def pins(inv: Inventory) -> list[Pin]:
    return [p for p in (read_pin(inv, a.name) for a in inv.apps) if p is not None]


def pin_after_rollback(inv: Inventory, journal: Journal, reason: str) -> Pin | None:
    """Record that a Compose app was rolled back (and which digests not to redeploy)."""
    prot = journal.protection
    if not prot.images:
        return None
    old = read_pin(inv, journal.app)
    bad = {k: list(v) for k, v in (old.bad if old else {}).items()}
    for svc, digest in journal.offered.items():
        if digest and digest != prot.digests.get(svc) and digest not in bad.get(svc, []):
            bad.setdefault(svc, []).append(digest)
    pin = Pin(journal.app, journal.run_id, time.time(), dict(prot.images), dict(prot.refs),
              dict(prot.digests), bad, reason)
    write_pin(inv, pin)
    return pin


def _short(digest: str) -> str:
    algo, sep, hexa = digest.partition(":")
    return f"{algo}:{hexa[:12]}" if sep else digest[:12]


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

    def reconnect(self) -> None:
        """Drop the SSH connections (the guest restarted); the next use opens new ones."""
        self._pool.close()
        self._pool = SshPool()

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
    """compose: service → image ID (what a rollback brings back)."""
    planned: dict[str, str] = field(default_factory=dict)
    """apt: package → version the upgrade will install."""
    refs: dict[str, str] = field(default_factory=dict)
    """compose: service → the image reference the compose file names."""
    digests: dict[str, str] = field(default_factory=dict)
    """compose: service → registry digest of the image it runs ("" when unknown)."""


def image_text(ref: str, digest: str, image_id: str) -> str:
    """``REF@sha256:<12>`` (the registry digest), else ``REF (id <12>)``."""
    if digest:
        return f"{ref}@{_short(digest)}"
    return f"{ref} (id {image_id.removeprefix('sha256:')[:12]})" if image_id else ref


def inspect_image(s: Session, ref: str) -> compose.ImageInfo | None:
    """``docker image inspect`` on the guest; None when the engine has no such image."""
    return inspect_images(s, [ref]).get(ref)


def inspect_images(s: Session, refs: Sequence[str]) -> dict[str, compose.ImageInfo | None]:
    """Several images in one ``docker image inspect`` (one SSH round trip); ref → info,
    None for each the engine does not have."""
    cfg = s.app.compose
    assert cfg is not None
    wanted = list(dict.fromkeys(r for r in refs if r))
    if not wanted:
        return {}
    res = s.run(compose.image_inspect_argv(cfg, *wanted), timeout=120)
    missing = "no such" in (res.stderr or "").lower()
    if res.returncode != 0 and not missing:
        raise LabkeeperError(f"docker image inspect exited {res.returncode}: "
                             f"{redact(res.stderr.strip())[-300:]}", transient=True)
    found = compose.parse_image_inspect(res.stdout) if res.stdout.strip() else []
    if res.returncode == 0 and len(found) == len(wanted):
        return dict(zip(wanted, found, strict=True))
    if len(wanted) == 1:
        return {wanted[0]: found[0] if found and res.returncode == 0 else None}
    by_id = {f.id: f for f in found}
    if all(r.startswith("sha256:") for r in wanted):
        return {r: by_id.get(r) for r in wanted}
    return {r: inspect_image(s, r) for r in wanted}  # some absent: one by one


def _config_refs(s: Session) -> dict[str, str]:
    """service → the image reference the compose file names now ({} when unreadable)."""
    cfg = s.app.compose
    assert cfg is not None
    res = s.run(compose.config_argv(cfg), timeout=120)
    if res.returncode != 0:
        s.log(f"{s.app.name}: docker compose config exited {res.returncode}: "
              f"{redact(res.stderr.strip())[-200:]}")
        return {}
    try:
        return compose.parse_config_images(res.stdout)
    except compose.ComposeOutputError as exc:
        s.log(f"{s.app.name}: docker compose config: {exc}")
        return {}


def compose_versions(s: Session, *, refs: Mapping[str, str] | None = None) -> Versions:
    """Per service: the image it runs (ID from the container's label), the reference
    the compose file names (``config``, unless ``refs`` are known) and the registry
    digest (one ``image inspect``)."""
    cfg = s.app.compose
    assert cfg is not None
    ps = s.run(compose.ps_argv(cfg), timeout=120)
    if ps.returncode != 0:
        raise UpdateFailed(f"docker compose ps exited {ps.returncode}: "
                           f"{redact(ps.stderr.strip())[-300:]}")
    containers = compose.parse_ps(ps.stdout)
    rows: list[compose.ImageRow] = []
    if any(not c.image_id for c in containers):  # compose before 2.21: no image label
        images = s.run(compose.images_argv(cfg), timeout=120)
        rows = compose.parse_images(images.stdout) if images.returncode == 0 else []
    svc = compose.service_images(containers, rows)
    ids = {k: v.image_id for k, v in svc.items() if v.image_id}
    named = dict(refs) if refs is not None else _config_refs(s)
    all_refs = {k: v.image for k, v in svc.items() if v.image} | named
    infos = inspect_images(s, list(ids.values()))
    digests = {}
    for k, iid in ids.items():
        info = infos.get(iid)
        digests[k] = info.digest_for(all_refs.get(k, "")) if info else ""
    return Versions({k: image_text(all_refs.get(k, v.image), digests.get(k, ""), v.image_id)
                     for k, v in svc.items()}, ids, refs=all_refs, digests=digests)


def record_versions(s: Session) -> Versions:
    """What runs now (read-only)."""
    app = s.app
    if app.strategy == "compose":
        return compose_versions(s)
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


# --- fetch (compose) -----------------------------------------------------------------------


@dataclass
class Offer:
    """What ``docker compose pull`` brought, per service, next to what runs."""

    ids: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    """Services whose reference now names another image than the one running."""
    held: dict[str, str] = field(default_factory=dict)
    """Changed services whose new digest was rolled back before (pinned apps)."""
    values: dict[str, str] = field(default_factory=dict)

    @property
    def new(self) -> bool:
        return bool(self.changed)


def fetch(s: Session, versions: Versions, *, pin: Pin | None = None,
          retry_bad: bool = False) -> Offer:
    """``docker compose pull``, then compare what the references name with what runs.

    A failed pull raises :class:`PullFailed` (transient) after putting back any tag it
    moved: nothing changed. Digests the app's pin remembers as bad are put back too
    (``held``): the app stays on its good images unless ``retry_bad``."""
    cfg = s.app.compose
    assert cfg is not None
    s.log(f"{s.app.name}: $ {redact(' '.join(compose.pull_argv(cfg)))}")
    res = s.run(compose.pull_argv(cfg), stream=True)
    if res.returncode != 0:
        put_back = _retag_quietly(s, versions.image_ids, versions.refs)
        tail = redact((res.stderr or res.stdout).strip())[-400:]
        raise PullFailed(f"docker compose pull exited {res.returncode}: {tail} — nothing "
                         f"changed (the containers run as before{put_back})")
    offer = Offer()
    infos = inspect_images(s, list(versions.refs.values()))
    for svc, ref in sorted(versions.refs.items()):
        info = infos.get(ref)
        if info is None:
            continue
        offer.ids[svc] = info.id
        offer.digests[svc] = info.digest_for(ref)
        offer.values[svc] = image_text(ref, offer.digests[svc], info.id)
        if info.id != versions.image_ids.get(svc):
            offer.changed.append(svc)
    if not versions.refs:  # nothing runs yet: nothing to compare, deploy what was pulled
        offer.changed.append("*")
    bad = pin.bad_digests() if pin and not retry_bad else set()
    offer.held = {svc: offer.digests[svc] for svc in offer.changed
                  if offer.digests.get(svc) in bad}
    if offer.held:
        _retag(s, versions.image_ids, versions.refs)
    return offer


def _retag(s: Session, images: Mapping[str, str], refs: Mapping[str, str]) -> list[str]:
    """``docker tag IMAGE_ID REF`` per service: the reference names the image again."""
    cfg = s.app.compose
    assert cfg is not None
    done = []
    for svc, ref in sorted(refs.items()):
        iid = images.get(svc)
        if not iid or compose.split_ref(ref)[1].startswith("sha256:"):
            continue  # nothing recorded, or a reference by digest (it cannot move)
        res = s.run(compose.tag_argv(cfg, iid, ref), timeout=120)
        if res.returncode != 0:
            raise LabkeeperError(f"docker tag {iid[:19]} {ref} exited {res.returncode}: "
                                 f"{redact(res.stderr.strip())[-300:]}", transient=True)
        done.append(ref)
    return done


def _retag_quietly(s: Session, images: Mapping[str, str], refs: Mapping[str, str]) -> str:
    try:
        done = _retag(s, images, refs)
    except LabkeeperError as exc:
        s.log(f"{s.app.name}: could not put the tags back: {exc}")
        return "; some tags could not be put back: a plain `up -d` may start new images"
    return f"; {len(done)} tag(s) put back" if done else ""


def ensure_images(s: Session, prot: Protection) -> list[str]:
    """Make sure every image the protection names is on the guest: when one was
    pruned, pull it by its registry digest. Raises when one cannot be had."""
    cfg = s.app.compose
    assert cfg is not None
    pulled = []
    present = inspect_images(s, list(prot.images.values()))
    for svc, iid in sorted(prot.images.items()):
        if present.get(iid) is not None:
            continue
        digest, ref = prot.digests.get(svc, ""), prot.refs.get(svc, "")
        if not digest or not ref:
            raise UpdateFailed(f"{s.app.name}: the image {svc} ran ({iid[:19]}) is gone "
                               "from the guest and has no registry digest to pull it by")
        by_digest = compose.digest_ref(ref, digest)
        s.log(f"{s.app.name}: {svc}'s image {iid[:19]} is not on the guest: pulling "
              f"{by_digest}")
        res = s.run(compose.docker_pull_argv(cfg, by_digest), stream=True)
        found = inspect_image(s, iid) if res.returncode == 0 else None
        if found is None:
            raise LabkeeperError(f"{s.app.name}: {svc}'s previous image {by_digest} could "
                                 f"not be pulled (exit {res.returncode}): "
                                 f"{redact(res.stderr.strip())[-300:]}", transient=True)
        pulled.append(by_digest)
    return pulled


def keep_images(s: Session, prot: Protection) -> None:
    """Tag the images a rollback needs (``REPO:labkeeper-keep-<app>-<service>``): an
    image that is tagged is not removed by ``docker image prune``."""
    cfg = s.app.compose
    assert cfg is not None
    for svc, iid in sorted(prot.images.items()):
        ref = prot.refs.get(svc)
        if not ref:
            continue
        res = s.run(compose.tag_argv(cfg, iid, compose.keep_ref(ref, s.app.name, svc)),
                    timeout=120)
        if res.returncode != 0:
            raise LabkeeperError(f"docker tag (keep {svc}) exited {res.returncode}: "
                                 f"{redact(res.stderr.strip())[-300:]}", transient=True)


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


def planned_protection(s: Session, run_id: str, versions: Versions) -> Protection:
    """The protection this run will take, named before it exists (the journal records
    it first, so a retry knows the snapshot is its own)."""
    g = s.guest
    prot = Protection(s.mode, g.node, g.vmid, g.type)
    if s.app.strategy == "compose":
        prot.images = dict(versions.image_ids)
        prot.refs = {k: v for k, v in versions.refs.items() if k in versions.image_ids}
        prot.digests = {k: v for k, v in versions.digests.items() if v}
    if prot.kind == "snapshot":
        prot.snapshot = snapshot_name(s.app.name, run_id)
    return prot


def protect(s: Session, run_id: str, versions: Versions, *, resume: bool = False
            ) -> Protection:
    """Take the protection the guest allows. A snapshot or archive of the same name
    that this run did not start (``resume``: the journal says it did) is refused,
    never reused."""
    g = s.guest
    prot = planned_protection(s, run_id, versions)
    if prot.kind == "snapshot":
        assert prot.snapshot is not None
        existing = {x.name for x in px.list_snapshots(s.api, g.node, g.vmid, g.type)}
        if prot.snapshot in existing and not resume:
            raise UpdateFailed(f"snapshot {prot.snapshot} of {g.type} {g.vmid} exists "
                               "already but this run did not take it: not reusing it")
        if prot.snapshot not in existing:
            s.log(f"{s.app.name}: snapshot {prot.snapshot} of {g.type} {g.vmid} on {g.node}")
            s.wait(px.create_snapshot(s.api, g.node, g.vmid, g.type, prot.snapshot))
    elif prot.kind == "vzdump":
        prot.volid = _protect_vzdump(s, run_id, resume=resume)
    elif prot.kind == "compose-images":
        if not versions.image_ids:
            raise UpdateFailed(f"{s.app.name}: no running image IDs to pin for a "
                               "compose-images rollback")
        missing = [svc for svc in prot.images if not prot.refs.get(svc)]
        if missing:
            raise UpdateFailed(f"{s.app.name}: no image reference known for "
                               f"{', '.join(missing)}: a rollback could not re-tag them")
        ensure_images(s, prot)
        keep_images(s, prot)
    return prot


def _protect_vzdump(s: Session, run_id: str, *, resume: bool) -> str:
    """A vzdump of the guest, marked protected (no retention or prune removes it while
    the update depends on it; cleanup unprotects it)."""
    g = s.guest
    storage = vzdump_storage(s.inv, s.app, g)
    notes = archive_notes(s.app.name, run_id)
    volid = _find_archive(s, storage, notes)
    if volid is not None and not resume:
        raise UpdateFailed(f"a pre-update archive with notes {notes!r} exists already but "
                           "this run did not make it: not reusing it")
    if volid is None:
        s.log(f"{s.app.name}: vzdump of {g.type} {g.vmid} to {storage} (no snapshots "
              "on its storage), protected")
        s.wait(px.vzdump(s.api, g.node, vmids=[g.vmid], mode="snapshot", storage=storage,
                         notes_template=notes, protected=True))
        volid = _find_archive(s, storage, notes)
    if volid is None:
        raise LabkeeperError(f"the pre-update vzdump of {g.vmid} is not on {storage}",
                             transient=True)
    if not _archive_protected(s, storage, volid):
        px.set_volume_attributes(s.api, g.node, volid, protected=True)
    return volid


def _archive_protected(s: Session, storage: str, volid: str) -> bool:
    return any(v.volid == volid and v.protected
               for v in px.backups(s.api, s.guest.node, storage, vmid=s.guest.vmid))


def _find_archive(s: Session, storage: str, notes: str) -> str | None:
    for vol in px.backups(s.api, s.guest.node, storage, vmid=s.guest.vmid):
        if vol.notes.strip() == notes:
            return vol.volid
    return None


def protection_exists(s: Session, prot: Protection) -> bool:
    """Is the protection still there? compose-images: every image on the guest, or
    pulled back by its digest now."""
    if prot.kind == "snapshot":
        names = {x.name for x in px.list_snapshots(s.api, prot.node, prot.vmid, prot.gtype)}
        return prot.snapshot in names
    if prot.kind == "vzdump":
        if prot.volid is None:
            return False
        storage = px.storage_of(prot.volid)
        return any(v.volid == prot.volid
                   for v in px.backups(s.api, prot.node, storage, vmid=prot.vmid))
    if prot.kind == "compose-images":
        if not prot.images:
            return False
        try:
            ensure_images(s, prot)
        except UpdateFailed:
            return False
        return True
    return True


# --- update -------------------------------------------------------------------------------


def run_update(s: Session) -> list[str]:
    """Run the strategy's commands in order, streaming output; raise on the first failure."""
    env = APT_ENV if s.app.strategy == "apt" else None
    done: list[str] = []
    for argv in apply_steps(s.app):
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
        s.reconnect()  # the guest restarted: old SSH connections are gone
        return f"rolled back to snapshot {prot.snapshot}" + _compose_after_guest_rollback(s, prot)
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
        s.reconnect()
        return f"restored from {prot.volid}" + _compose_after_guest_rollback(s, prot)
    if prot.kind == "compose-images":
        return restore_images(s, prot)
    raise RollbackFailed(f"{s.app.name}: rollback is 'none': nothing to roll back to")


def restore_images(s: Session, prot: Protection) -> str:
    """Compose back on the protection's images, lastingly: each image (pulled by digest
    when it was pruned) re-tagged onto the reference the compose file names, then
    ``up -d --pull never``. A plain ``up -d`` later keeps them."""
    cfg = s.app.compose
    assert cfg is not None
    refs = dict(prot.refs) or record_versions(s).refs  # journals of earlier versions
    ensure_images(s, prot)
    s.log(f"{s.app.name}: re-tagging {len(prot.images)} service(s) onto their old images")
    _retag(s, prot.images, refs)
    s.run(("rm", "-f", "--", f"{cfg.dir}/{compose.ROLLBACK_OVERRIDE}"), timeout=60)
    res = s.run(compose.rollback_up_argv(cfg), stream=True)
    if res.returncode != 0:
        raise LabkeeperError(f"docker compose up with the old images exited "
                             f"{res.returncode}: {redact(res.stderr.strip())[-300:]}",
                             transient=True)
    return "compose services back on their previous images (re-tagged: " + \
        ", ".join(f"{svc}={_short(prot.digests.get(svc) or iid)}"
                  for svc, iid in sorted(prot.images.items())) + ")"


def _compose_after_guest_rollback(s: Session, prot: Protection) -> str:
    """The guest is back, but the images were pulled before it was protected: the
    references may name the new images. Re-tag the old ones (a later ``up -d`` keeps
    them)."""
    if s.app.strategy != "compose" or not prot.images:
        return ""
    deadline = time.monotonic() + ENGINE_WAIT
    while True:  # the guest just started: its engine (or sshd) may not answer yet
        try:
            return "; " + restore_images(s, prot)
        except LabkeeperError as exc:
            if not exc.transient or time.monotonic() >= deadline:
                raise
            s.log(f"{s.app.name}: the guest's engine is not ready ({exc}); trying again")
            s.reconnect()
            time.sleep(2)


ENGINE_WAIT = 120.0
"""Seconds a restarted guest's Docker engine gets to answer after a guest rollback."""


def _ensure_running(s: Session, prot: Protection) -> None:
    status = px.guest_status(s.api, prot.node, prot.vmid, prot.gtype)  # type: ignore[arg-type]
    if status.status != "running":
        s.wait(px.start_guest(s.api, prot.node, prot.vmid, prot.gtype))  # type: ignore[arg-type]


# --- cleanup ------------------------------------------------------------------------------


def cleanup(s: Session, keep: int | None = None) -> list[str]:
    """Delete pre-update snapshots / archives of this guest beyond ``keep``; never one
    that another app's open journal names. The app's update is over: its archives no
    longer need to be protected from retention (they are unprotected)."""
    keep = s.app.keep_snapshots if keep is None else keep
    g = s.guest
    removed: list[str] = []
    if s.inv.proxmox is None or s.mode in ("compose-images", "none"):
        return removed  # nothing of this app's on Proxmox
    spare = sorted(spared_names(s.inv, but=s.app.name))
    snaps = px.list_snapshots(s.api, g.node, g.vmid, g.type)
    for name in stale_snapshots(snaps, keep, spare=spare):
        s.log(f"{s.app.name}: deleting old snapshot {name}")
        s.wait(px.delete_snapshot(s.api, g.node, g.vmid, g.type, name))
        removed.append(name)
    if s.mode == "vzdump":
        storage = vzdump_storage(s.inv, s.app, g)
        vols = px.backups(s.api, g.node, storage, vmid=g.vmid)
        for vol in vols:
            if vol.protected and vol.notes.startswith(PREFIX) and vol.volid not in spare:
                px.set_volume_attributes(s.api, g.node, vol.volid, protected=False)
        for volid in stale_archives(vols, keep, spare=spare):
            s.log(f"{s.app.name}: deleting old pre-update archive {volid}")
            upid = px.delete_volume(s.api, g.node, volid)
            if upid is not None:
                s.wait(upid)
            removed.append(volid)
    return removed


# --- results ------------------------------------------------------------------------------

Status = Literal["updated", "current", "rolled-back", "failed", "skipped", "dry-run",
                 "recovered", "blocked", "held", "stale"]
"""``current``: the registry offers what runs (nothing to do); ``blocked``: another
update of the guest holds its lock; ``held``: the registry offers only digests that
were rolled back before; ``stale``: an old unfinished update waits for a person."""
NOT_DONE: frozenset[str] = frozenset({"blocked", "held", "stale"})
"""Not updated, and not fine: never a green run (the run fails, the CLI exits 3)."""


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
    digests: dict[str, dict[str, str]] = field(default_factory=dict)
    """compose: ``before`` / ``offered`` / ``after`` → service → registry digest."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per step (fetch, protect, update, gate, ...)."""

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
