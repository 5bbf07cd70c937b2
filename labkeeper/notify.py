"""Telling people: Apprise notifications and healthchecks-style pings.

Both carry tokens in their URLs, so the inventory holds secret references and
they are resolved here, at send time. A notification or ping that cannot be
delivered is logged as a warning and never fails the job that sent it.

Checks that run on a schedule and find the same problem again (the dead-man's
check) remember what they already told people in a small :class:`AlertLog`, so a
late backup makes one message when it becomes late, one when it changes, and a
reminder a day — not one per run.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from labkeeper.errors import SecretError
from labkeeper.inventory import Inventory
from labkeeper.secrets import redact, resolve

log = logging.getLogger("labkeeper.notify")

PingKind = Literal["start", "success", "fail"]
Event = Literal["failure", "rollback", "drill", "missing_backup", "success"]


@dataclass(frozen=True)
class Delivery:
    target: str  # redacted description, safe to show
    ok: bool
    detail: str = ""


def ping_url(base: str | None, value: str, kind: PingKind) -> str:
    """The URL to hit: a full URL as given, or a check id appended to ``base``;
    ``/start`` or ``/fail`` appended for those kinds (healthchecks.io convention)."""
    url = value if urlparse(value).scheme in ("http", "https") else \
        f"{(base or '').rstrip('/')}/{value.lstrip('/')}"
    if not urlparse(url).scheme:
        raise ValueError("ping is neither a URL nor a check id with a base_url")
    return url if kind == "success" else f"{url.rstrip('/')}/{kind}"


def ping(inv: Inventory, flow: str, kind: PingKind, *, body: str = "") -> Delivery | None:
    """Send the flow's start/success/fail ping, if the inventory configures one."""
    hc = inv.notifications.healthchecks
    if hc is None or flow not in hc.pings:
        return None
    ref = hc.pings[flow]
    try:
        url = ping_url(str(hc.base_url) if hc.base_url else None,
                       resolve(ref).get_secret_value(), kind)
    except (SecretError, ValueError) as exc:
        log.warning("ping %s for %s not sent: %s", kind, flow, exc)
        return Delivery(f"ping {flow}/{kind}", False, str(exc))
    data = redact(body)[:10_000].encode() or None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=hc.timeout,  # noqa: S310 - http(s) only
                                    context=ssl.create_default_context()) as resp:
            ok = 200 <= resp.status < 300
            detail = f"HTTP {resp.status}"
    except (urllib.error.URLError, OSError) as exc:
        ok, detail = False, redact(str(exc))
    if not ok:
        log.warning("ping %s for %s failed: %s", kind, flow, detail)
    return Delivery(f"ping {flow}/{kind}", ok, detail)


def notify(inv: Inventory, event: Event, title: str, body: str) -> list[Delivery]:
    """Send a message to every Apprise URL when the inventory subscribes to ``event``."""
    n = inv.notifications
    if event not in n.on or not n.apprise:
        return []
    import apprise

    out: list[Delivery] = []
    for i, ref in enumerate(n.apprise):
        target = f"apprise[{i}] ({ref})"
        try:
            url = resolve(ref).get_secret_value()
        except SecretError as exc:
            log.warning("notification to %s not sent: %s", target, exc)
            out.append(Delivery(target, False, str(exc)))
            continue
        ap = apprise.Apprise()
        if not ap.add(url):
            log.warning("notification to %s not sent: not an Apprise URL", target)
            out.append(Delivery(target, False, "not an Apprise URL"))
            continue
        ok = bool(ap.notify(title=redact(title), body=redact(body)))
        if not ok:
            log.warning("notification to %s failed", target)
        out.append(Delivery(target, ok, "" if ok else "delivery failed"))
    return out


# -- alerts that repeat: remembered, re-sent on change or as a daily reminder ----------------

Reason = Literal["new", "changed", "reminder"]


@dataclass(frozen=True)
class Alert:
    """One thing that is wrong now. ``key`` names it across runs (``database:appdb``);
    ``state`` is what is wrong (``late``, ``missing``, ``failed``)."""

    key: str
    state: str
    title: str
    body: str


@dataclass(frozen=True)
class AlertPlan:
    send: list[tuple[Alert, Reason]] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    """Keys told about before that are fine now (say so once)."""


def plan_alerts(previous: Mapping[str, Mapping[str, str]], current: Iterable[Alert],
                now: datetime, remind_after: timedelta = timedelta(days=1)) -> AlertPlan:
    """Which alerts to send: new keys, keys whose state changed, and keys last told
    about ``remind_after`` ago or longer. Keys in ``previous`` that are not current
    have recovered."""
    plan = AlertPlan()
    keys = set()
    for alert in current:
        keys.add(alert.key)
        prev = previous.get(alert.key)
        if prev is None:
            plan.send.append((alert, "new"))
        elif prev.get("state") != alert.state:
            plan.send.append((alert, "changed"))
        elif now - _when(prev.get("notified")) >= remind_after:
            plan.send.append((alert, "reminder"))
    plan.recovered.extend(sorted(set(previous) - keys))
    return plan


def after_alerts(previous: Mapping[str, Mapping[str, str]], current: Iterable[Alert],
                 delivered: Iterable[str], recovered_told: Iterable[str],
                 now: datetime) -> dict[str, dict[str, str]]:
    """The log to keep after sending: delivered alerts are stamped ``now``; alerts not
    delivered stay as they were (so an undelivered new alert is tried again next run);
    a recovery is forgotten once told (or when there was nobody to tell)."""
    done, told = set(delivered), set(recovered_told)
    out: dict[str, dict[str, str]] = {}
    for alert in current:
        prev = previous.get(alert.key)
        if alert.key in done:
            out[alert.key] = {"state": alert.state, "notified": now.isoformat()}
        elif prev is not None:
            out[alert.key] = dict(prev)
    for key, prev in previous.items():
        if key not in out and key not in told:
            out[key] = dict(prev)
    return out


def _when(text: str | None) -> datetime:
    """A stored time; anything unreadable counts as long ago (a reminder is due)."""
    try:
        when = datetime.fromisoformat(text or "")
    except ValueError:
        return datetime(1970, 1, 1, tzinfo=UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)


class AlertLog:
    """What a scheduled check already told people: ``<state_dir>/<name>.json``
    (written atomically, under a lock), next to the metrics store."""

    def __init__(self, state_dir: Path, name: str) -> None:
        self.path = state_dir / f"{name}.json"

    def read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        alerts = data.get("alerts") if isinstance(data, dict) else None
        return {str(k): {str(a): str(b) for a, b in v.items()}
                for k, v in (alerts or {}).items() if isinstance(v, dict)}

    def write(self, alerts: Mapping[str, Mapping[str, str]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"alerts": alerts}, f, indent=1, sort_keys=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise


def delivered(deliveries: Sequence[Delivery]) -> bool:
    """A message counts as told when any target took it, or when there is no target
    (nothing to retry). Failed targets were logged as warnings."""
    return not deliveries or any(d.ok for d in deliveries)


def send_alerts(inv: Inventory, event: Event, log_: AlertLog, alerts: Sequence[Alert],
                recoveries: Mapping[str, tuple[str, str]], now: datetime,
                remind_after: timedelta = timedelta(days=1),
                unknown: Collection[str] = ()) -> dict[str, Any]:
    """Send what :func:`plan_alerts` says is due, tell recoveries (``key -> (title,
    body)``), keep the log entries of ``unknown`` keys (not checked this time) as they
    are, forget other keys that went away, and update the log. Returns what was sent,
    for the run's report."""
    previous = log_.read()
    plan = plan_alerts(previous, alerts, now, remind_after)
    sent: list[dict[str, Any]] = []
    done: list[str] = []
    for alert, reason in plan.send:
        title = alert.title + (" (reminder)" if reason == "reminder" else "")
        ok = delivered(notify(inv, event, title, alert.body))
        sent.append({"key": alert.key, "reason": reason, "delivered": ok})
        if ok:
            done.append(alert.key)
    told: list[str] = []
    for key in plan.recovered:
        if key in unknown:
            continue
        if key not in recoveries:
            told.append(key)
            continue
        title, body = recoveries[key]
        ok = delivered(notify(inv, event, title, body))
        sent.append({"key": key, "reason": "recovered", "delivered": ok})
        if ok:
            told.append(key)
    log_.write(after_alerts(previous, alerts, done, told, now))
    return {"sent": sent, "unchanged": sorted({a.key for a in alerts} -
                                              {a.key for a, _ in plan.send})}
