"""Field types of the inventory: names, addresses, paths, secrets, cron, modes.

Each is an annotated type whose validator says what is expected and never echoes the
value it rejects (it may be a pasted secret).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import zoneinfo
from pathlib import Path, PurePosixPath
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from labkeeper.secrets import SecretRef

VMID_MIN = 100
VMID_MAX = 999_999_999


def _regex_type(pattern: str, what: str) -> Any:
    rx = re.compile(pattern)

    def check(value: str) -> str:
        if not rx.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return Annotated[str, AfterValidator(check)]


Name = _regex_type(
    r"[a-z0-9][a-z0-9_-]{0,62}",
    "a name: lowercase letters, digits, '-' and '_', starting with a letter or digit, "
    "at most 63 characters",
)
GuestName = _regex_type(
    r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
    "a hostname label: lowercase letters, digits and '-', not starting or ending with '-'",
)
NodeName = _regex_type(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?",
    "a Proxmox node name (letters, digits and '-')",
)
StorageName = _regex_type(
    r"[a-z][a-z0-9._-]*[a-z0-9]",
    "a Proxmox storage id (lowercase letters, digits, '-', '_', '.'; starts with a letter)",
)
Tag = _regex_type(
    r"[a-z0-9_][a-z0-9_+.-]{0,63}",
    "a Proxmox tag (lowercase letters, digits, '_', '-', '+', '.')",
)
PoolName = _regex_type(r"[A-Za-z0-9_-]{1,64}", "a Proxmox pool id (letters, digits, '-', '_')")
UserName = _regex_type(r"[a-z_][a-z0-9_.-]{0,31}\$?", "a POSIX user name")
PgIdent = _regex_type(
    r"[A-Za-z0-9_][A-Za-z0-9_$.-]{0,62}",
    "a PostgreSQL name (letters, digits, '_', '$', '.', '-'; at most 63 characters)",
)
EnvName = _regex_type(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")
PackageName = _regex_type(r"[a-z0-9][a-z0-9+.:=~-]*", "a Debian package name (optionally =version)")
BridgeName = _regex_type(r"[A-Za-z][A-Za-z0-9_.-]{0,14}", "a Linux bridge name like vmbr0")
IfaceName = _regex_type(r"[a-z][a-z0-9]{0,14}", "an interface name like eth0 or net0")
ContainerName = _regex_type(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", "a Docker container name")

VMID = Annotated[int, Field(ge=VMID_MIN, le=VMID_MAX)]
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
NonNegSeconds = Annotated[float, Field(ge=0, le=7 * 24 * 3600)]
Minutes = Annotated[float, Field(gt=0)]
Hours = Annotated[float, Field(gt=0)]


def _sanitize_secret(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Run :data:`SecretRef` validation; re-raise without any part of the value."""
    try:
        return handler(value)
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        detail = ""
        if first["type"] == "value_error":
            reason = str(first["ctx"]["error"])
            if not reason.startswith("not a secret reference"):
                detail = reason.split(", got ")[0] + "; "
        raise ValueError(
            f"{detail}must be a secret reference (env:NAME, file:/path or prefect-block:NAME), "
            "never the secret itself (the value is not shown)"
        ) from None


Secret = Annotated[SecretRef, WrapValidator(_sanitize_secret)]
"""A secret field: a validated :data:`SecretRef` whose errors never echo the value."""


def _check_abs_path(value: Path) -> Path:
    if not PurePosixPath(value).is_absolute():
        raise ValueError("must be an absolute path")
    return value


AbsPath = Annotated[Path, AfterValidator(_check_abs_path)]


def _check_rel_path(value: str) -> str:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts:
        raise ValueError("must be a relative path inside the directory (no '..')")
    return value


RelPath = Annotated[str, AfterValidator(_check_rel_path)]

_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_hostname(value: str) -> bool:
    if not value or len(value) > 253:
        return False
    labels = value.rstrip(".").split(".")
    if all(label.isdigit() for label in labels):
        return False  # looks like a (bad) IPv4 address
    return all(_LABEL.fullmatch(label) for label in labels)


def _check_host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _is_hostname(value):
        raise ValueError("must be an IP address or a DNS host name")
    return value


HostAddr = Annotated[str, AfterValidator(_check_host)]


def _check_ipv4(value: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError("must be an IPv4 address") from None


IPv4 = Annotated[str, AfterValidator(_check_ipv4)]


def _check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError("must be an IP address") from None


IPAddr = Annotated[str, AfterValidator(_check_ip)]


def _check_http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("has an invalid port") from None
    return value


HttpUrl = Annotated[str, AfterValidator(_check_http_url)]

_SCP_GIT = re.compile(r"[A-Za-z0-9_.-]+@[A-Za-z0-9.-]+:[^\s]+")


def _check_git_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme in ("https", "http", "ssh", "git") and parts.hostname:
        return value
    if _SCP_GIT.fullmatch(value):
        return value
    if parts.scheme == "file" and not parts.netloc and parts.path.startswith("/"):
        return value  # a repository on the guest itself (a mount, a local mirror)
    raise ValueError("must be a git URL (https://, ssh://, git://, file:///path "
                     "or user@host:path)")


GitUrl = Annotated[str, AfterValidator(_check_git_url)]

_GIT_REF = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")


def check_git_ref(value: str) -> str:
    """A branch, tag or commit: never an option (``--upload-pack=...``), a refspec
    (``a:b``, ``+a``) or a reflog expression (``@{...}``)."""
    if (not _GIT_REF.fullmatch(value) or ".." in value or "//" in value
            or value.endswith(("/", ".", ".lock"))):
        raise ValueError("must be a branch, tag or commit: letters, digits, '.', '_', '-', "
                         "'/', starting with a letter or digit")
    return value


GitRef = Annotated[str, AfterValidator(check_git_ref)]


def _check_docker_host(value: str) -> str:
    """``unix:///abs/path``, ``tcp://host:port`` or ``ssh://[user@]host[:port]``."""
    parts = urlsplit(value)
    if parts.scheme == "unix" and not parts.netloc and parts.path.startswith("/") \
            and ".." not in PurePosixPath(parts.path).parts:
        return value
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if parts.scheme == "tcp" and parts.hostname and port and parts.path in ("", "/"):
        return value
    if parts.scheme == "ssh" and parts.hostname and parts.path in ("", "/"):
        return value
    raise ValueError("must be unix:///abs/path.sock, tcp://host:port or ssh://[user@]host[:port]")


DockerHost = Annotated[str, AfterValidator(_check_docker_host)]
"""Where the docker CLI finds the engine (``docker --host``), e.g. a rootless socket."""


def _check_fingerprint(value: str) -> str:
    if not re.fullmatch(r"([0-9A-Fa-f]{2}:){31}[0-9A-Fa-f]{2}", value):
        raise ValueError("must be a SHA-256 fingerprint: 32 hex byte pairs separated by ':'")
    return value.upper()


Fingerprint = Annotated[str, AfterValidator(_check_fingerprint)]

_KEY_TYPES = (
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)


def _check_public_key(value: str) -> str:
    if "PRIVATE KEY" in value:
        raise ValueError("looks like a PRIVATE key; give the public key (ssh-ed25519 AAAA...)")
    parts = value.split()
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        raise ValueError("must be an OpenSSH public key line like 'ssh-ed25519 AAAA... comment'")
    try:
        base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("the key's base64 part does not decode") from None
    return value


PublicKey = Annotated[str, AfterValidator(_check_public_key)]


def _check_host_key(value: str) -> str:
    if value.startswith("SHA256:"):
        if not re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}=?", value):
            raise ValueError("a host key fingerprint must look like SHA256:<43 base64 chars>")
        return value
    return _check_public_key(value)


HostKey = Annotated[str, AfterValidator(_check_host_key)]
"""A pinned SSH host key: a public key line, or its ``SHA256:...`` fingerprint."""


def _check_timezone(value: str) -> str:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("must be an IANA time zone like Europe/Berlin or UTC") from None
    return value


TimeZone = Annotated[str, AfterValidator(_check_timezone)]


def _int_to_str(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, {}),
    ("hour", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)}),
    ("day of week", 0, 7, {d: i for i, d in enumerate(_DAYS)}),
)


def _cron_value(text: str, name: str, lo: int, hi: int, names: dict[str, int]) -> int:
    if text.isdigit():
        value = int(text)
    elif text.lower() in names:
        return names[text.lower()]
    else:
        raise ValueError(f"cron {name} field: {text!r} is not a number")
    if not lo <= value <= hi:
        raise ValueError(f"cron {name} field: {value} is out of range {lo}-{hi}")
    return value


def check_cron(expr: str) -> str:
    """Validate a 5-field cron expression (minute hour day-of-month month day-of-week).

    Supports ``*``, numbers, ``a-b``, ``*/n``, ``a-b/n``, lists with ``,`` and month
    and weekday names. Returns the expression with whitespace normalised.
    """
    parts = expr.split()
    if len(parts) != 5:
        raise ValueError(
            f"a cron schedule needs 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)}"
        )
    for part, (name, lo, hi, names) in zip(parts, _CRON_FIELDS, strict=True):
        for item in part.split(","):
            base, slash, step = item.partition("/")
            if slash:
                if not step.isdigit() or int(step) < 1 or int(step) > hi:
                    raise ValueError(f"cron {name} field: step must be a number 1-{hi}")
            if base == "*":
                continue
            first, dash, last = base.partition("-")
            a = _cron_value(first, name, lo, hi, names)
            if dash:
                b = _cron_value(last, name, lo, hi, names)
                if a > b:
                    raise ValueError(f"cron {name} field: range {a}-{b} runs backwards")
            elif slash:
                continue  # "5/15": start at 5, every 15
    return " ".join(parts)


Cron = Annotated[str, AfterValidator(check_cron)]


def _check_hhmm(value: str) -> str:
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", value)
    if not m:
        raise ValueError("must be a time of day HH:MM (00:00-23:59)")
    return f"{int(m.group(1)):02d}:{m.group(2)}"


TimeOfDay = Annotated[str, AfterValidator(_check_hhmm)]


def _check_mode(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError('quote file modes as octal strings, e.g. "0640"')
    if isinstance(value, str):
        if not re.fullmatch(r"0?[0-7]{3,4}", value):
            raise ValueError('must be an octal file mode like "0640"')
        return int(value, 8)
    return value


FileMode = Annotated[int, BeforeValidator(_check_mode), Field(ge=0, le=0o7777)]

Argv = Annotated[list[str], Field(min_length=1)]
"""A command as an argv list (never a shell string): ``[systemctl, restart, app]``."""
