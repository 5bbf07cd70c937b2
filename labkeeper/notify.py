"""Telling people: Apprise notifications and healthchecks-style pings.

Both carry tokens in their URLs, so the inventory holds secret references and
they are resolved here, at send time. A notification or ping that cannot be
delivered is logged as a warning and never fails the job that sent it.
"""

from __future__ import annotations

import logging
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Literal
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
