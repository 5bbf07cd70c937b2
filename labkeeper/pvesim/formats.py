"""Named PVE parameter formats (``format: "pve-vmid"`` …) as pure validators.

Each validator takes the string value and returns ``None`` when it is valid or
the error text PVE gives (without the ``invalid format - `` prefix). Formats
that are not listed here are accepted: the simulator never crashes on an
unknown format name, it just does not check it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

Validator = Callable[[str], "str | None"]

_VMID = re.compile(r"^[1-9]\d{2,8}$")
_NODE = re.compile(r"^(?i:[a-z0-9](?:[a-z0-9\-]*[a-z0-9])?)$")
_STORAGE_ID = re.compile(r"^(?i:[a-z][a-z0-9\-_.]*[a-z0-9])$")
_CONFIGID = re.compile(r"^(?i:[a-z][a-z0-9_-]+)$")
_POOLID = re.compile(r"^[A-Za-z0-9_\-]+$")
_TAG = re.compile(r"^(?i:[a-z0-9_][a-z0-9_\-+.]*)$")
_MAC = re.compile(r"^(?i:[0-9a-f]{2}(?::[0-9a-f]{2}){5})$")
_DNS_LABEL = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?)"
_DNS_NAME = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
_USERID = re.compile(r"^[^\s:/]+@[A-Za-z][A-Za-z0-9.\-_]+$")
_REALM = re.compile(r"^[A-Za-z][A-Za-z0-9.\-_]+$")
_VOLUME_ID = re.compile(r"^(?i:[a-z][a-z0-9\-_.]*[a-z0-9]):.+$")
_DISK_SIZE = re.compile(r"^\d+(?:\.\d+)?[KMGT]?$")
_EMAIL = re.compile(r"^[\w+\-~]+(?:\.[\w+\-~]+)*@[a-zA-Z0-9\-]+(?:\.[a-zA-Z0-9\-]+)*$")
_LIST_SPLIT = re.compile(r"[,;\s]+")

STORAGE_CONTENT_TYPES = ("images", "rootdir", "vztmpl", "iso", "backup", "snippets", "import")
TASK_STATUS_TYPES = ("ok", "error", "warning", "unknown")


def _re_check(regex: re.Pattern[str], message: str) -> Validator:
    def check(value: str) -> str | None:
        return None if regex.match(value) else message.replace("%s", value)

    return check


def _list_of(item: Validator) -> Validator:
    def check(value: str) -> str | None:
        for part in _LIST_SPLIT.split(value.strip()):
            if part == "":
                continue
            err = item(part)
            if err:
                return err
        return None

    return check


def _ipv4(value: str) -> str | None:
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        return "value does not look like a valid IPv4 address"
    return None


def _ipv6(value: str) -> str | None:
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return "value does not look like a valid IPv6 address"
    return None


def _ip(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "value does not look like a valid IP address"
    return None


def _cidr(version: int | None) -> Validator:
    def check(value: str) -> str | None:
        try:
            net = ipaddress.ip_interface(value)
        except ValueError:
            return "value does not look like a valid CIDR network"
        if "/" not in value or (version is not None and net.version != version):
            return "value does not look like a valid CIDR network"
        return None

    return check


def _ipv4_config(value: str) -> str | None:
    if value in ("dhcp", "manual"):
        return None
    if _cidr(4)(value) is None:
        return None
    return "value does not look like a valid IPv4 network configuration"


def _ipv6_config(value: str) -> str | None:
    if value in ("dhcp", "auto", "manual"):
        return None
    if _cidr(6)(value) is None:
        return None
    return "value does not look like a valid IPv6 network configuration"


def _vmid(value: str) -> str | None:
    return None if _VMID.match(value) else "value does not look like a valid VM ID"


def _storage_content(value: str) -> str | None:
    if value in STORAGE_CONTENT_TYPES or value == "none":
        return None
    return f"invalid content type '{value}'"


def _calendar(value: str) -> str | None:
    from labkeeper.pvesim.calendar import CalendarError, parse_calendar_event

    try:
        parse_calendar_event(value)
    except CalendarError as exc:
        return str(exc)
    return None


def _startup(value: str) -> str | None:
    for part in value.split(","):
        key, sep, val = part.partition("=")
        if not sep and key.isdigit():
            continue
        if key not in ("order", "up", "down") or not val.isdigit():
            return "invalid startup order"
    return None


def _priv(value: str) -> str | None:
    return None if re.match(r"^[A-Za-z.]+$", value) else f"invalid privilege name '{value}'"


def _email_or_user(value: str) -> str | None:
    if _EMAIL.match(value) or _USERID.match(value):
        return None
    return "value does not look like a valid email address or user name"


NAMED: dict[str, Validator] = {
    "pve-vmid": _vmid,
    "pve-vmid-list": _list_of(_vmid),
    "pve-node": _re_check(_NODE, "value does not look like a valid node name"),
    "pve-node-list": _list_of(_re_check(_NODE, "value does not look like a valid node name")),
    "pve-storage-id": _re_check(_STORAGE_ID, "storage ID '%s' contains illegal characters"),
    "pve-storage-id-list": _list_of(
        _re_check(_STORAGE_ID, "storage ID '%s' contains illegal characters")
    ),
    "pve-configid": _re_check(_CONFIGID, "invalid configuration ID '%s'"),
    "pve-configid-list": _list_of(_re_check(_CONFIGID, "invalid configuration ID '%s'")),
    "pve-poolid": _re_check(_POOLID, "pool name '%s' contains illegal characters"),
    "pve-tag-list": _list_of(_re_check(_TAG, "invalid tag '%s'")),
    "pve-userid": _re_check(_USERID, "value does not look like a valid user name"),
    "pve-realm": _re_check(_REALM, "value does not look like a valid realm"),
    "pve-volume-id": _re_check(_VOLUME_ID, "unable to parse volume ID '%s'"),
    "pve-storage-content": _storage_content,
    "pve-storage-content-list": _list_of(_storage_content),
    "pve-calendar-event": _calendar,
    "pve-startup-order": _startup,
    "pve-priv-list": _list_of(_priv),
    "pve-task-status-type-list": _list_of(
        lambda v: None if v in TASK_STATUS_TYPES else f"invalid status type '{v}'"
    ),
    "ipv4": _ipv4,
    "ipv6": _ipv6,
    "ip": _ip,
    "address": _ip,
    "CIDR": _cidr(None),
    "CIDRv4": _cidr(4),
    "CIDRv6": _cidr(6),
    "IPorCIDR": lambda v: None if _ip(v) is None or _cidr(None)(v) is None else (
        "value does not look like a valid IP address or CIDR network"
    ),
    "pve-ipv4-config": _ipv4_config,
    "pve-ipv6-config": _ipv6_config,
    "mac-addr": _re_check(_MAC, "value does not look like a valid MAC address"),
    "dns-name": _re_check(_DNS_NAME, "value does not look like a valid DNS name"),
    "dns-name-list": _list_of(_re_check(_DNS_NAME, "value does not look like a valid DNS name")),
    "disk-size": _re_check(_DISK_SIZE, "value does not look like a valid disk size"),
    "email-or-username": _email_or_user,
    "email-or-username-list": _list_of(_email_or_user),
}

# Named formats that are property strings themselves.
NAMED_PROPERTY_STRINGS: dict[str, dict[str, dict[str, object]]] = {
    "prune-backups": {
        "keep-all": {"optional": 1, "type": "boolean"},
        "keep-last": {"optional": 1, "type": "integer", "minimum": 0},
        "keep-hourly": {"optional": 1, "type": "integer", "minimum": 0},
        "keep-daily": {"optional": 1, "type": "integer", "minimum": 0},
        "keep-weekly": {"optional": 1, "type": "integer", "minimum": 0},
        "keep-monthly": {"optional": 1, "type": "integer", "minimum": 0},
        "keep-yearly": {"optional": 1, "type": "integer", "minimum": 0},
    },
    "pve-qm-ipconfig": {
        "ip": {"optional": 1, "type": "string", "format": "pve-ipv4-config"},
        "gw": {"optional": 1, "type": "string", "format": "ipv4"},
        "ip6": {"optional": 1, "type": "string", "format": "pve-ipv6-config"},
        "gw6": {"optional": 1, "type": "string", "format": "ipv6"},
    },
    "backup-fleecing": {
        "enabled": {"optional": 1, "type": "boolean", "default_key": 1},
        "storage": {"optional": 1, "type": "string", "format": "pve-storage-id"},
    },
    "backup-performance": {
        "max-workers": {"optional": 1, "type": "integer", "minimum": 1, "maximum": 256},
        "pbs-entries-max": {"optional": 1, "type": "integer", "minimum": 1},
    },
}
