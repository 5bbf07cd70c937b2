"""The pure parts of an update: run ids and protection names, the maintenance window,
apt's argv and output, and the commands each strategy runs (the plan a person reads).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from labkeeper import compose
from labkeeper import proxmox as px
from labkeeper.inventory import App, AppApt, MaintenanceWindow
from labkeeper.update.records import PREFIX

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


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
