"""Things an inventory may say that are valid but unsafe: warnings, never errors.

``labkeeper validate`` prints them (exit status unchanged) and ``labkeeper doctor``
shows them as ``warn`` rows. Pure: reads the validated inventory only.

- A database (or drill server) reached over the network with an ``sslmode`` that does
  not verify the server (``disable``, ``allow``, ``prefer`` -- the default --,
  ``require``): whoever sits in between reads the password and every dump.
- A restic repository at ``s3:http://`` or ``rest:http://``, or an S3 endpoint at
  ``http://``, on a host that is not loopback: bucket keys, and with ``rest:`` the
  repository itself, travel in clear text.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from labkeeper.inventory.root import Inventory

VERIFYING_SSLMODES = ("verify-ca", "verify-full")
GUIDE = "docs/ADMIN_GUIDE.md"


def is_loopback(host: str | None) -> bool:
    """``localhost``, 127.0.0.0/8, ``::1`` or a unix socket directory."""
    if not host:
        return False
    host = host.strip("[]")
    if host.startswith("/") or host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Warning_:
    target: str
    """What it is about: ``database appdb``, ``repository offsite``."""
    text: str
    """Why, and what to do (without the target)."""

    def __str__(self) -> str:
        return f"{self.target}: {self.text}"


def _pg_warning(kind: str, name: str, host: str | None, sslmode: str) -> Warning_ | None:
    if sslmode in VERIFYING_SSLMODES or host is None or is_loopback(host):
        return None
    how = "it only encrypts" if sslmode == "require" else "and may not even encrypt"
    return Warning_(f"{kind} {name}", (
        f"sslmode {sslmode} to {host} does not verify the server ({how}): a machine in "
        "between can pose as the server and read the password and the data; use sslmode: "
        f"verify-full with the server's CA ({GUIDE}, \"PostgreSQL over TLS\")"))


def _database_host(inv: Inventory, db: Any) -> str | None:
    if getattr(db, "container", None) is not None:
        return None  # reached inside its container (socket or loopback there)
    if db.host is not None:
        return str(db.host)
    if db.guest is not None:
        return inv.guest(db.guest).address
    return None


def database_warnings(inv: Inventory) -> list[Warning_]:
    out = []
    for db in inv.databases:
        w = _pg_warning("database", db.name, _database_host(inv, db), db.sslmode)
        if w:
            out.append(w)
    drills = getattr(inv, "drills", None)
    for server in getattr(drills, "servers", None) or []:
        host = server.host
        if host is None and server.guest is not None:
            host = inv.guest(server.guest).address
        if getattr(server, "container", None) is None:
            w = _pg_warning("drill server", server.name, host, server.sslmode)
            if w:
                out.append(w)
    return out


def plain_http_host(url: str) -> str | None:
    """The host of a restic URL or endpoint that talks plain HTTP to a non-loopback
    host (``s3:http://``, ``rest:http://``, ``http://``); None otherwise."""
    for prefix in ("s3:", "rest:"):
        if url.startswith(prefix):
            url = url[len(prefix):]
            break
    if not url.startswith("http://"):
        return None
    host = urlsplit(url).hostname
    return None if is_loopback(host) else (host or "?")


def repository_warnings(inv: Inventory) -> list[Warning_]:
    out = []
    for repo in inv.repositories:
        host = plain_http_host(repo.url)
        if host:
            scheme = repo.url.split("://")[0]
            out.append(Warning_(f"repository {repo.name}", (
                f"{scheme}://{host} is plain HTTP to a host that is not loopback: "
                "credentials and (for rest:) the data travel unencrypted; use https "
                f"({GUIDE}, \"Repositories over TLS\")")))
        endpoint = plain_http_host(str(repo.s3.endpoint)) if repo.s3 is not None else None
        if endpoint and not (host and repo.url.startswith("s3:")):
            out.append(Warning_(f"repository {repo.name}", (
                f"s3.endpoint http://{endpoint} is plain HTTP to a host that is not "
                "loopback: the bucket traffic travels unencrypted; use https "
                f"({GUIDE}, \"Repositories over TLS\")")))
    return out


def warning_items(inv: Inventory) -> list[Warning_]:
    """Every warning for ``inv``, in a stable order."""
    return [*database_warnings(inv), *repository_warnings(inv)]


def warnings(inv: Inventory) -> list[str]:
    """Every warning for ``inv`` as ``<target>: <why and what to do>``."""
    return [str(w) for w in warning_items(inv)]
