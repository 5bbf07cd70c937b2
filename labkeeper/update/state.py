"""What an update keeps in the state dir: the journal of an unfinished update, the pins
of rolled-back Compose apps, and the per-guest lock (``flock``; the kernel releases it
when its holder dies, so a killed run never locks anyone out).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from labkeeper.errors import ConfigError
from labkeeper.inventory import App, Inventory
from labkeeper.update.records import GuestBusy, Journal, Pin

STALE_MARGIN = 600.0
"""Seconds beyond the gate's own time after which an unfinished update's journal is
*stale*: its run is long dead, the lab may have moved on (data written since), so no
automatic rollback to its protection; a person decides (``resolve``)."""

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
    _atomic_write(journal_path(inv, journal.app), journal.to_json())


def close_journal(inv: Inventory, app: str) -> None:
    journal_path(inv, app).unlink(missing_ok=True)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
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
    _atomic_write(pin_path(inv, pin.app), json.dumps(asdict(pin), indent=1, sort_keys=True))


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
