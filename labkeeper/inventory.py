"""The lab inventory: pydantic models of the whole lab and YAML loading with file:line errors.

One YAML file describes the lab: the Proxmox connection, nodes and storages, the
guests to provision, plain SSH hosts, bootstrap roles, PostgreSQL databases and
their drills, restic repositories, vzdump jobs, applications with health probes
and rollback, file-tree backups, notifications and drill settings.

Rules:

- Every model is strict (``extra="forbid"``): an unknown key is an error, with a
  "did you mean 'xyz'?" hint when a known key is close.
- Secrets are never in the inventory: every secret field is a
  :data:`labkeeper.secrets.SecretRef` (``env:NAME``, ``file:/path``,
  ``prefect-block:NAME``). Validation messages never echo a rejected value.
- :func:`load_inventory` / :func:`validate_file` report *every* problem at once,
  each as ``FILE:LINE field.path[3].name: message`` — schema errors, YAML syntax
  errors, duplicate keys and cross-reference errors alike.
- The YAML dialect is YAML 1.1 as PyYAML reads it, except that only
  ``true``/``false`` are booleans (``on``, ``yes``, ``no`` stay strings: the
  Norway problem) and ``22:00`` is the string ``"22:00"``, not 1320 (no
  sexagesimal numbers) and dates stay strings.

Behaviour belongs to the flows; this module only describes *shape*, plus a few
pure helpers that read the inventory (:meth:`Inventory.ssh_targets`, look-ups by
name, :meth:`Inventory.secret_refs`).
"""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import re
import types
import typing
import zoneinfo
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    model_validator,
)

from labkeeper import inventory_sites, userdirs
from labkeeper.errors import ConfigError
from labkeeper.inventory_pitr import PitrServer
from labkeeper.inventory_sites import SiteName, Sites
from labkeeper.secrets import SecretRef, check_reference
from labkeeper.yaml_loader import Document as _Document
from labkeeper.yaml_loader import Problem, UnreadableFile, format_path, read_source

__all__ = [
    "App",
    "Database",
    "DrillServer",
    "Guest",
    "Host",
    "Inventory",
    "Problem",
    "Repository",
    "SshTargetSpec",
    "Storage",
    "VzdumpJob",
    "load_inventory",
    "parse_inventory",
    "problems_report",
    "validate_file",
    "validate_text",
]

VMID_MIN = 100
VMID_MAX = 999_999_999
DRILL_DB_PREFIX = "labkeeper_drill_"
LOCAL_DRILL_SERVER = "local"

# --------------------------------------------------------------------------------------
# Field types. Every validator here describes what is expected and never echoes the
# value it rejects (it may be a pasted secret).
# --------------------------------------------------------------------------------------


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

VMID = Annotated[int, Field(ge=VMID_MIN, le=VMID_MAX)]
Port = Annotated[int, Field(ge=1, le=65535)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(gt=0, le=7 * 24 * 3600)]
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


# --------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------

_FIELDS_KEY = "labkeeper.fields"
_SKIP_XREF_KEY = "labkeeper.skip_xref"


class _Model(BaseModel):
    """Base of every inventory model: strict (unknown keys are errors) and frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True,
                              use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _remember_fields(cls, data: Any, info: ValidationInfo) -> Any:
        # The loader maps each mapping to the fields its model knows, for
        # "did you mean" hints on unknown keys.
        ctx = info.context
        if isinstance(ctx, dict) and isinstance(data, dict):
            ctx.setdefault(_FIELDS_KEY, {})[id(data)] = tuple(cls.model_fields)
        return data


def _exactly_one(model: BaseModel, names: Sequence[str], what: str) -> None:
    given = [n for n in names if getattr(model, n) is not None]
    if len(given) != 1:
        options = ", ".join(names)
        if not given:
            raise ValueError(f"{what}: set exactly one of {options}")
        raise ValueError(f"{what}: set exactly one of {options} (got {', '.join(given)})")


# --------------------------------------------------------------------------------------
# lab, settings
# --------------------------------------------------------------------------------------


class Lab(_Model):
    """Who this lab is. ``name`` is restic's ``--host`` for every snapshot."""

    name: Name
    timezone: TimeZone = "UTC"
    domain: str | None = None
    """DNS search domain of the lab (e.g. ``home.arpa``), informational."""


class Metrics(_Model):
    """Prometheus metrics: a textfile-collector file and/or a /metrics listener."""

    textfile: AbsPath | None = None
    """Rewritten after every job, for node_exporter's textfile collector."""
    listen_address: IPAddr | None = None
    listen_port: Port | None = None
    """/metrics, served by ``labkeeper serve`` and ``labkeeper metrics serve``."""

    @model_validator(mode="after")
    def _pair(self) -> Metrics:
        if (self.listen_address is None) != (self.listen_port is None):
            raise ValueError("listen_address and listen_port go together")
        return self


class ProvisionSettings(_Model):
    """Guardrails for the provision flow (issue 6)."""

    managed_tag: Tag = "labkeeper"
    """Guests without this tag are never modified."""
    max_changes_without_yes: PositiveInt = 5
    cleanup_on_failure: Literal["destroy", "report"] = "destroy"
    ssh_wait_timeout: Seconds = 300
    guest_state_dir: AbsPath = Path("/var/lib/labkeeper")
    """On each guest: where bootstrap keeps its markers (what it already did)."""


NonNegSeconds = Annotated[float, Field(ge=0, le=7 * 24 * 3600)]


class JobTuning(_Model):
    """Waits and polls inside the jobs (internal knobs, kept off the Prefect Run forms)."""

    stall_timeout: Seconds = 300
    """pg_backup: seconds restic may accept no data before the dump and restic are
    killed (its repository backend is down) and the database is reported failed."""
    update_lock_timeout: NonNegSeconds = 10
    """update: seconds to wait for another update of the same guest before the app is
    reported ``blocked``."""
    approval_poll: PositiveInt = 10
    """runbook: seconds between checks for an operator's answer to an approval step."""
    drill_guest_poll: Seconds = 0.5
    """dr_drill: first seconds between Proxmox task polls of a guest drill."""
    vzdump_poll_max: Seconds = 5
    """vzdump: most seconds between Proxmox task-status polls."""
    vzdump_lock_retries: NonNegInt = 2
    """vzdump: how often a guest that is locked (by another task) is tried again."""
    vzdump_lock_retry_delay: NonNegSeconds = 30
    """vzdump: seconds between those tries."""
    site_check_timeout: Seconds = 3
    """site-check: seconds per reachability probe."""


class Settings(_Model):
    state_dir: AbsPath = Field(default_factory=userdirs.default_state_dir)
    """Where labkeeper keeps its state (pending cleanups, metrics, restic caches); default
    ``/var/lib/labkeeper`` for root or a user who can write it, else
    ``$XDG_STATE_HOME/labkeeper`` (``~/.local/state/labkeeper``)."""
    known_hosts: AbsPath = Field(default_factory=userdirs.default_known_hosts)
    """SSH host keys, checked strictly; default ``/etc/labkeeper/known_hosts`` for root
    or a user who can read it, else ``$XDG_CONFIG_HOME/labkeeper/known_hosts``
    (``~/.config/labkeeper/known_hosts``)."""
    cache_dir: AbsPath | None = None
    """restic cache root (one sub-directory per repository); default ``$RESTIC_CACHE_DIR``
    when the environment sets it, else ``state_dir/cache``."""
    restic_binary: str | None = None
    """The restic labkeeper runs here for every repository (a full path when the machine
    has several); default ``$LABKEEPER_RESTIC``, else ``restic`` on PATH. Path sets name
    their host's restic in ``path_backups[].restic_binary``."""
    work_pool: Name = "homelab"
    sites: Sites = {}
    """Several machines: each site's worker and queue (labkeeper/inventory_sites.py)."""
    default_site: SiteName | None = None
    """Where jobs without ``site:`` run; default: the first site."""
    metrics: Metrics = Metrics()
    provision: ProvisionSettings = ProvisionSettings()
    tuning: JobTuning = JobTuning()
    """Internal waits and polls of the jobs (not on the Run forms)."""
    progress_interval: Seconds = 30
    """Seconds between progress lines (bytes, rate, ETA) of a long stream in the run
    log: database dumps and restores, drills, vzdump off-site copies; a line also at
    every 10 % of a known size. A terminal shows a live bar as well."""
    pg_backup_parallel: Annotated[int, Field(ge=1, le=16)] = 1
    """Databases a pg_backup run dumps at the same time (one Prefect run, one globals
    dump per server either way). Each runs pg_dump and two restics: more than the
    machine's cores buys nothing; with restic 0.14 a lock released by one backup while
    another restic of the same repository checks locks costs that restic 45-95 s."""

    @property
    def effective_cache_dir(self) -> Path:
        return self.cache_dir or self.state_dir / "cache"


# --------------------------------------------------------------------------------------
# proxmox
# --------------------------------------------------------------------------------------

_TOKEN_ID = re.compile(r"[^\s:/@!=]+@[A-Za-z][A-Za-z0-9._-]*![A-Za-z][A-Za-z0-9._-]*")


def _check_token_id(value: str) -> str:
    if not _TOKEN_ID.fullmatch(value):
        raise ValueError(
            "must be a Proxmox API token id USER@REALM!TOKENNAME (the secret goes in "
            "token_secret as a reference)"
        )
    return value


TokenId = Annotated[str, AfterValidator(_check_token_id)]


class Tls(_Model):
    """TLS for the Proxmox API: verified against the system CAs or ``ca_file``,
    or pinned to a SHA-256 certificate fingerprint. ``verify: false`` is accepted
    only together with a pinned fingerprint."""

    verify: bool = True
    ca_file: AbsPath | None = None
    fingerprint: Fingerprint | None = None

    @model_validator(mode="after")
    def _safe(self) -> Tls:
        if not self.verify and self.fingerprint is None:
            raise ValueError(
                "verify: false needs a pinned fingerprint (never an unverified connection)"
            )
        if not self.verify and self.ca_file is not None:
            raise ValueError("ca_file has no effect with verify: false")
        return self


class Node(_Model):
    name: NodeName
    address: HostAddr | None = None
    """Address for SSH/SFTP to the node (off-site copies stream archives from it)."""
    ssh_user: UserName = "root"


StorageType = Literal[
    "dir", "lvmthin", "lvm", "zfspool", "nfs", "cifs", "pbs", "cephfs", "rbd", "btrfs",
    "glusterfs", "iscsi", "zfs",
]
StorageContent = Literal["images", "rootdir", "vztmpl", "backup", "iso", "snippets", "import"]
_SNAPSHOT_TYPES = frozenset({"lvmthin", "zfspool", "rbd", "btrfs", "zfs"})


class Storage(_Model):
    name: StorageName
    type: StorageType
    content: list[StorageContent] = Field(min_length=1)
    snapshots: bool | None = None
    """Whether guest disks here support snapshots; default from the type
    (lvmthin, zfspool, rbd, btrfs: yes)."""
    shared: bool = False
    nodes: list[NodeName] = []
    """Nodes that have this storage; empty means every node."""

    @property
    def supports_snapshots(self) -> bool:
        return self.snapshots if self.snapshots is not None else self.type in _SNAPSHOT_TYPES

    def available_on(self, node: str) -> bool:
        return not self.nodes or node in self.nodes


class Proxmox(_Model):
    host: HostAddr
    port: Port = 8006
    token_id: TokenId
    token_secret: Secret
    tls: Tls = Tls()
    timeout: Seconds = 30
    """Seconds per API request."""
    task_timeout: Seconds = 3600
    """Default seconds to wait for a task (UPID) to finish."""
    nodes: list[Node] = Field(min_length=1)
    storages: list[Storage] = []


# --------------------------------------------------------------------------------------
# ssh, hosts
# --------------------------------------------------------------------------------------


class SshDefaults(_Model):
    """Defaults for every SSH target (hosts and guests with an ``ssh`` section)."""

    user: UserName = "root"
    port: Port = 22
    key: Secret | None = None
    """Private key (ed25519) as a secret reference."""
    known_hosts: AbsPath | None = None
    """Default: ``settings.known_hosts``."""
    trust_on_first_use: bool = False
    connect_timeout: Seconds = 10
    command_timeout: Seconds = 3600


class Host(_Model):
    """An SSH host that is not a Proxmox guest (a NAS, a drill server...)."""

    name: GuestName
    address: HostAddr
    port: Port | None = None
    user: UserName | None = None
    key: Secret | None = None
    host_key: HostKey | None = None
    trust_on_first_use: bool | None = None
    connect_timeout: Seconds | None = None
    description: str = ""
    tags: list[Tag] = []


class SshTargetSpec(_Model):
    """A resolved SSH target: inventory defaults merged with per-target settings."""

    name: str
    kind: Literal["host", "guest"]
    address: str
    port: int
    user: str
    key: str | None
    known_hosts: Path
    trust_on_first_use: bool
    host_key: str | None
    connect_timeout: float
    command_timeout: float
    vmid: int | None = None


# --------------------------------------------------------------------------------------
# health probes (apps, guest drills)
# --------------------------------------------------------------------------------------


class HttpProbe(_Model):
    url: HttpUrl
    status: Annotated[int, Field(ge=100, le=599)] = 200
    body_contains: str | None = None
    verify_tls: bool = True
    ca_file: AbsPath | None = None
    method: Literal["GET", "HEAD"] = "GET"


class TcpProbe(_Model):
    host: HostAddr | None = None
    """Default: the app's guest address."""
    port: Port


class CommandProbe(_Model):
    """A command run over SSH on the app's guest."""

    argv: Argv
    expect_exit: Annotated[int, Field(ge=0, le=255)] = 0
    stdout_contains: str | None = None


class ContainerProbe(_Model):
    """Docker health of Compose services (all services with a healthcheck if empty)."""

    services: list[str] = []


class Probe(_Model):
    """One health probe: exactly one of http / tcp / command / container."""

    name: str | None = None
    http: HttpProbe | None = None
    tcp: TcpProbe | None = None
    command: CommandProbe | None = None
    container: ContainerProbe | None = None
    timeout: Seconds = 5

    @model_validator(mode="after")
    def _one(self) -> Probe:
        _exactly_one(self, ("http", "tcp", "command", "container"), "probe")
        return self

    @property
    def kind(self) -> str:
        for k in ("http", "tcp", "command", "container"):
            if getattr(self, k) is not None:
                return k
        raise AssertionError("unreachable: validated probe has a kind")



# --------------------------------------------------------------------------------------
# guests
# --------------------------------------------------------------------------------------


def _check_ip_config(value: str) -> str:
    if value in ("dhcp", "manual"):
        return value
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError('must be "dhcp", "manual" or an IPv4 address with prefix') from None
    if "/" not in value:
        raise ValueError("needs a prefix length, e.g. 10.0.0.30/24")
    return str(iface)


def _check_ip6_config(value: str) -> str:
    if value in ("dhcp", "auto", "manual"):
        return value
    try:
        iface = ipaddress.IPv6Interface(value)
    except ValueError:
        raise ValueError('must be "dhcp", "auto", "manual" or an IPv6 address/prefix') from None
    if "/" not in value:
        raise ValueError("needs a prefix length, e.g. fd00::30/64")
    return str(iface)


def _check_mac(value: str) -> str:
    if not re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", value):
        raise ValueError("must be a MAC address like BC:24:11:00:00:01")
    return value.upper()


class Nic(_Model):
    name: IfaceName = "eth0"
    """Interface name in the guest (LXC); QEMU NICs are numbered by position (net0...)."""
    bridge: BridgeName = "vmbr0"
    ip: Annotated[str, AfterValidator(_check_ip_config)] | None = "dhcp"
    gateway: IPv4 | None = None
    ip6: Annotated[str, AfterValidator(_check_ip6_config)] | None = None
    gateway6: IPAddr | None = None
    vlan: Annotated[int, Field(ge=1, le=4094)] | None = None
    mac: Annotated[str, AfterValidator(_check_mac)] | None = None
    firewall: bool = False
    model: Literal["virtio", "e1000", "vmxnet3", "rtl8139"] = "virtio"
    """QEMU NIC model (ignored for LXC)."""
    mtu: Annotated[int, Field(ge=576, le=65520)] | None = None

    @property
    def static_ip(self) -> str | None:
        """The static IPv4 address without prefix, or None for dhcp/manual."""
        if self.ip is None or self.ip in ("dhcp", "manual"):
            return None
        return str(ipaddress.IPv4Interface(self.ip).ip)

    @model_validator(mode="after")
    def _gateway(self) -> Nic:
        if self.gateway is not None:
            if self.static_ip is None:
                raise ValueError("gateway needs a static ip (DHCP provides its own gateway)")
            net = ipaddress.IPv4Interface(self.ip or "").network
            if ipaddress.IPv4Address(self.gateway) not in net:
                raise ValueError(f"gateway is outside the NIC's network {net}")
        return self


class Resources(_Model):
    cores: Annotated[int, Field(ge=1, le=512)] = 1
    sockets: Annotated[int, Field(ge=1, le=4)] = 1
    """QEMU only."""
    memory_mb: Annotated[int, Field(ge=16)] = 512
    swap_mb: NonNegInt = 512
    """LXC only."""
    balloon_mb: NonNegInt | None = None
    """QEMU only: minimum memory for ballooning (0 disables the balloon device)."""
    disk_gb: PositiveInt = 8
    """Root disk size. Provisioning grows disks, never shrinks them."""
    storage: StorageName
    """Storage for the root disk (must be declared in proxmox.storages)."""


class LxcFeatures(_Model):
    nesting: bool = False
    """Needed for Docker in an LXC (with keyctl for unprivileged containers)."""
    keyctl: bool = False
    fuse: bool = False
    mount: list[str] = []


class GuestSsh(_Model):
    """SSH to a guest; unset fields come from the top-level ``ssh`` defaults.
    ``address`` defaults to the first static NIC address."""

    address: HostAddr | None = None
    port: Port | None = None
    user: UserName | None = None
    key: Secret | None = None
    host_key: HostKey | None = None
    trust_on_first_use: bool | None = None
    connect_timeout: Seconds | None = None


_IPCONFIG = re.compile(
    r"(ip=(dhcp|[0-9./]+))?(,?gw=[0-9.]+)?(,?ip6=([0-9a-fA-F:/]+|auto|dhcp))?(,?gw6=[0-9a-fA-F:]+)?"
)


def _check_ipconfig(value: str) -> str:
    if not value or not _IPCONFIG.fullmatch(value):
        raise ValueError("must be a Proxmox ipconfig string like 'ip=10.0.0.40/24,gw=10.0.0.1'")
    return value


class CloudInit(_Model):
    """Cloud-init for QEMU clones. ``ipconfig`` defaults to one entry per NIC
    derived from ``network``."""

    user: UserName | None = None
    password: Secret | None = None
    ssh_keys: list[PublicKey] = []
    """Public keys (not secrets) authorised for ``user``."""
    ipconfig: list[Annotated[str, AfterValidator(_check_ipconfig)]] | None = None
    nameservers: list[IPAddr] = []
    searchdomain: str | None = None
    upgrade: bool = False


class GuestDrill(_Model):
    """Guest DR drill: restore the latest vzdump archive into a scratch VMID."""

    enabled: bool = True
    schedule: Cron | None = None
    """Default: ``drills.schedule``."""
    rto_minutes: Minutes = 60
    rpo_hours: Hours = 24 * 8
    check: Literal["status", "ssh", "probe"] = "status"
    """How to prove the restored copy came up. ``status``: PVE says it runs.
    ``ssh``: it runs *and* an SSH login to ``address`` succeeds (user, key and
    host key from the guest's ssh section and the ssh defaults; the copy has the
    original's host keys, so pin ``ssh.host_key`` or add ``address`` to
    known_hosts). ``probe``: it runs *and* ``probe`` passes. Both are retried
    until ``drills.guests.boot_timeout``, and need ``drills.guests.bridge`` (a
    detached copy cannot be reached): otherwise the check fails the drill."""
    probe: Probe | None = None
    """For ``check: probe``: http, tcp (host default: ``address``) or command
    (run over SSH on ``address``)."""
    address: HostAddr | None = None
    """Where the worker reaches the restored copy on the isolated drill bridge.
    Needed by ``ssh``, tcp probes without a host, and command probes. Never
    defaults to the guest's own address: that would reach the original guest,
    not the copy, and pass a drill that proved nothing."""

    @model_validator(mode="after")
    def _probe(self) -> GuestDrill:
        if self.check == "probe" and self.probe is None:
            raise ValueError("check: probe needs a probe")
        if self.probe is not None and self.probe.container is not None:
            raise ValueError("a guest drill cannot use a container probe (no compose "
                             "app): use http, tcp or command")
        return self


_VOLID = re.compile(r"(?P<storage>[a-z][a-z0-9._-]*[a-z0-9]):vztmpl/[^/\s]+")


class Guest(_Model):
    name: GuestName
    vmid: VMID
    type: Literal["lxc", "qemu"]
    node: NodeName
    template: Annotated[str | None, BeforeValidator(_int_to_str)] = None
    """LXC: an ostemplate volid (``local:vztmpl/debian-12-...tar.zst``);
    QEMU: the vmid of the template to clone. Required unless ``state: absent`` or
    ``managed: false``."""
    full_clone: bool = True
    """QEMU: full clone (True) or linked clone."""
    resources: Resources
    network: list[Nic] = []
    tags: list[Tag] = []
    pool: PoolName | None = None
    onboot: bool = True
    startup_order: NonNegInt | None = None
    description: str = ""
    state: Literal["present", "absent"] = "present"
    protection: bool = False
    unprivileged: bool = True
    """LXC only."""
    features: LxcFeatures | None = None
    """LXC only."""
    ssh: GuestSsh | None = None
    cloud_init: CloudInit | None = None
    roles: list[Name] = []
    depends_on: list[GuestName] = []
    """Guests/hosts this one needs running first (maintenance stops in reverse order)."""
    cleanup_on_failure: Literal["destroy", "report"] | None = None
    """Override of settings.provision.cleanup_on_failure."""
    drill: GuestDrill | None = None
    managed: bool = True
    """False: provisioning leaves this guest alone (never creates, changes or destroys
    it; ``provision plan`` lists it as unmanaged). The inventory still describes it
    for backups, drills and apps. ``labkeeper init`` writes this for templates and
    guests it cannot describe faithfully, with the reason in a comment."""

    @property
    def template_vmid(self) -> int | None:
        if self.type == "qemu" and self.template is not None:
            return int(self.template)
        return None

    @property
    def template_storage(self) -> str | None:
        if self.type == "lxc" and self.template is not None:
            m = _VOLID.fullmatch(self.template)
            return m.group("storage") if m else None
        return None

    @property
    def static_ip(self) -> str | None:
        for nic in self.network or ():
            if nic.static_ip is not None:
                return nic.static_ip
        return None

    @property
    def address(self) -> str | None:
        """Where to reach the guest: ``ssh.address`` or the first static NIC IP."""
        if self.ssh is not None and self.ssh.address is not None:
            return self.ssh.address
        return self.static_ip

    @model_validator(mode="after")
    def _per_type(self) -> Guest:
        if self.state == "present" and self.managed and self.template is None:
            raise ValueError("template is required (lxc: ostemplate volid; qemu: template vmid)")
        if self.template is not None:
            if self.type == "lxc" and not _VOLID.fullmatch(self.template):
                raise ValueError(
                    "lxc template must be an ostemplate volid like "
                    "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
                )
            if self.type == "qemu" and not (
                self.template.isdigit() and VMID_MIN <= int(self.template) <= VMID_MAX
            ):
                raise ValueError("qemu template must be the vmid of a template to clone")
            if self.type == "qemu" and int(self.template) == self.vmid:
                raise ValueError("a guest cannot be cloned from itself")
        if self.type == "lxc" and self.cloud_init is not None:
            raise ValueError("cloud_init is for qemu guests only")
        if self.type == "qemu" and self.features is not None:
            raise ValueError("features are for lxc guests only")
        if self.name in self.depends_on:
            raise ValueError("a guest cannot depend on itself")
        names = [n.name for n in self.network]
        if len(set(names)) != len(names):
            raise ValueError("network interface names must be unique")
        return self


# --------------------------------------------------------------------------------------
# roles (bootstrap over SSH)
# --------------------------------------------------------------------------------------


class RoleFile(_Model):
    """A file written on the guest. Exactly one of content / source / secret."""

    path: AbsPath
    content: str | None = None
    source: RelPath | None = None
    """A template in this repository (relative to the inventory file)."""
    secret: Secret | None = None
    """The whole file is a secret (written mode 0600 unless ``mode`` says otherwise)."""
    mode: FileMode | None = None
    owner: UserName = "root"
    group: UserName = "root"

    @model_validator(mode="after")
    def _one(self) -> RoleFile:
        _exactly_one(self, ("content", "source", "secret"), "file")
        return self


class ComposeStack(_Model):
    """A Docker Compose stack: where it lives on the guest and where it comes from."""

    dir: AbsPath
    project: Name | None = None
    """Compose project name; default: the directory's name."""
    file: RelPath = "compose.yaml"
    git_url: GitUrl | None = None
    git_ref: GitRef | None = None
    source: RelPath | None = None
    """A directory in this repository copied to ``dir`` (instead of git_url)."""
    docker_host: DockerHost | None = None
    """The engine's address when not the default socket (``docker --host``)."""
    environment: dict[EnvName, str] = {}
    """Plain ``.env`` entries."""
    secrets: dict[EnvName, Secret] = {}
    """``.env`` entries resolved from secret references (the file is written 0600)."""

    @model_validator(mode="after")
    def _src(self) -> ComposeStack:
        if self.git_url is not None and self.source is not None:
            raise ValueError("set git_url or source, not both")
        if self.git_ref is not None and self.git_url is None:
            raise ValueError("git_ref needs git_url")
        both = set(self.environment) & set(self.secrets)
        if both:
            raise ValueError(f"variables in both environment and secrets: {sorted(both)}")
        return self


class Role(_Model):
    description: str = ""
    packages: list[PackageName] = []
    files: list[RoleFile] = []
    commands: list[Argv] = []
    """Idempotent setup commands, as argv lists, run after packages and files."""
    compose: ComposeStack | None = None


# --------------------------------------------------------------------------------------
# databases and drills
# --------------------------------------------------------------------------------------


class SmokeQuery(_Model):
    """A query run against a restored database; must return one value that
    satisfies min / max / equals."""

    sql: Annotated[str, Field(min_length=1)]
    min: int | None = None
    max: int | None = None
    equals: Annotated[str | None, BeforeValidator(_int_to_str)] = None
    name: str | None = None

    @model_validator(mode="after")
    def _expect(self) -> SmokeQuery:
        if self.min is None and self.max is None and self.equals is None:
            raise ValueError("a smoke query needs min, max or equals")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class DatabaseDrill(_Model):
    enabled: bool = True
    schedule: Cron | None = None
    """Default: ``drills.schedule``."""
    server: Name = LOCAL_DRILL_SERVER
    """A server in ``drills.servers``, or ``local`` (libpq defaults of the worker)."""
    rto_minutes: Minutes = 60
    rpo_hours: Hours = 26
    keep_on_failure: bool = False
    smoke_queries: list[SmokeQuery] = []


SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]


ContainerName = _regex_type(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", "a Docker container name")

LOCAL_DOCKER_HOST = "localhost"
"""``host:`` of a containerised database whose engine is on the worker itself: its
``docker`` runs here, without SSH."""


class DatabaseContainer(_Model):
    """PostgreSQL inside a container with no published port (an app's ``*_postgres``):
    the client tools run in the container (``docker exec``), on the SSH host or guest
    named by the database's ``host``/``guest`` (``host: localhost``: this worker)."""

    name: ContainerName
    docker_host: DockerHost | None = None
    """The engine's address when not the default socket (``docker --host``)."""
    pghost: str = "/var/run/postgresql"
    """Where the tools connect inside the container: its socket directory (the
    default: peer/trust auth as ``exec_user``) or an address such as 127.0.0.1."""
    exec_user: UserName = "postgres"
    """``docker exec -u``: the OS user the tools run as inside the container."""


class Database(_Model):
    """A PostgreSQL database backed up with pg_dump into a restic repository."""

    name: Name
    host: HostAddr | None = None
    guest: GuestName | None = None
    """Instead of ``host``: the guest running PostgreSQL (its address is used)."""
    container: DatabaseContainer | None = None
    """PostgreSQL runs in this container on ``host``/``guest`` (then the SSH target
    where ``docker exec`` runs; ``host: localhost``: this worker)."""
    port: Port = 5432
    dbname: PgIdent | None = None
    """Default: ``name``."""
    user: PgIdent = "postgres"
    password: Secret | None = None
    """None: no password (peer/trust or a client certificate)."""
    sslmode: SslMode = "prefer"
    sslrootcert: AbsPath | None = None
    repository: Name | None = None
    """Default: the only repository, when there is exactly one."""
    format: Literal["plain", "custom"] = "plain"
    """plain deduplicates best in restic (see issue 4)."""
    site: SiteName | None = None
    """The site whose worker backs it up (``settings.sites``); default: the default site."""
    globals: bool = True
    """Also back up ``pg_dumpall --globals-only`` for this server."""
    schedule: Cron = "0 2 * * *"
    timeout_minutes: Minutes = 240
    drill: DatabaseDrill = DatabaseDrill(enabled=False)

    @property
    def effective_dbname(self) -> str:
        return self.dbname or self.name

    @model_validator(mode="after")
    def _where(self) -> Database:
        _exactly_one(self, ("host", "guest"), "database location")
        if self.sslrootcert is not None and self.sslmode not in ("verify-ca", "verify-full"):
            raise ValueError("sslrootcert needs sslmode verify-ca or verify-full")
        return self


class DrillServer(_Model):
    """A PostgreSQL server where database drills restore into scratch databases
    named ``labkeeper_drill_*`` (never colliding with a real database)."""

    name: Name
    host: HostAddr | None = None
    guest: GuestName | None = None
    """Neither host nor guest: libpq defaults of the worker (PGHOST, unix socket)."""
    container: DatabaseContainer | None = None
    """The drill server runs in this container on ``host``/``guest`` (as for
    :attr:`Database.container`)."""
    port: Port = 5432
    user: PgIdent = "postgres"
    password: Secret | None = None
    sslmode: SslMode = "prefer"
    maintenance_db: PgIdent = "postgres"

    @model_validator(mode="after")
    def _where(self) -> DrillServer:
        if self.host is not None and self.guest is not None:
            raise ValueError("set host or guest, not both")
        if self.container is not None and self.host is None and self.guest is None:
            raise ValueError("container needs host or guest (where docker runs)")
        return self


class VmidRange(_Model):
    first: VMID
    last: VMID

    @model_validator(mode="after")
    def _order(self) -> VmidRange:
        if self.first > self.last:
            raise ValueError("first must be ≤ last")
        return self

    def __contains__(self, vmid: object) -> bool:
        return isinstance(vmid, int) and self.first <= vmid <= self.last


class GuestDrillSettings(_Model):
    scratch_vmids: VmidRange = VmidRange(first=9900, last=9999)
    """Restored guests get a VMID from this range; it may hold no inventory guest."""
    bridge: BridgeName | None = None
    """Isolated bridge for restored guests; None detaches their network."""
    storage: StorageName | None = None
    """Where to restore; default: the guest's own storage."""
    node: NodeName | None = None
    """Node to restore on; default: the guest's node."""
    boot_timeout: Seconds = 300
    keep_on_failure: bool = False
    """Keep a failed drill's copy for inspection (tagged ``labkeeper-drill-kept``;
    never swept, reported by every guest drill until you destroy it)."""
    stale_scratch_hours: Hours = 6
    """Scratch copies are tagged ``labkeeper-drill`` and marked in their
    description when restored. A guest drill first destroys marked copies in
    ``scratch_vmids`` older than this (left by a drill that died); younger ones
    may belong to a drill still running. Unmarked guests are never touched."""


class RepositoryDrillSettings(_Model):
    enabled: bool = True
    schedule: Cron | None = None
    read_data_period: PositiveInt = 12
    """The whole repository is read over this many drills (``--read-data-subset n/N``)."""
    restore_random_snapshot: bool = True
    repositories: list[Name] = []
    """Empty: every repository."""


class PathDrillSettings(_Model):
    """Path-set drills (target ``paths:<host>/<set>``): a random sample of files of
    the set's latest snapshot is restored (``restic dump``) and its SHA-256
    compared with the file on the host (``sha256sum`` over SSH). A file changed
    since the backup (size or mtime not as restic recorded it, or mtime newer
    than the snapshot) or deleted is reported, not failed; a different content
    in an unchanged file fails the drill."""

    enabled: bool = True
    """Include every path set (or ``path_sets``) in ``all``."""
    schedule: Cron | None = None
    """Default: ``drills.schedule``."""
    sample_files: PositiveInt = 20
    """Files compared per path set (all of them when the snapshot has fewer)."""
    max_file_mb: Annotated[float, Field(gt=0)] = 1024
    """Larger files are left out of the sample (their count is reported)."""
    rpo_hours: Hours = 26
    """Objective for the age of the latest snapshot."""
    path_sets: list[Name] = []
    """Empty: every path set."""


class Drills(_Model):
    schedule: Cron = "0 5 * * 0"
    """Default schedule of every drill."""
    servers: list[DrillServer] = []
    guests: GuestDrillSettings = GuestDrillSettings()
    repository: RepositoryDrillSettings = RepositoryDrillSettings()
    paths: PathDrillSettings = PathDrillSettings()


# --------------------------------------------------------------------------------------
# restic repositories
# --------------------------------------------------------------------------------------

_RESTIC_SCHEMES = ("s3", "b2", "sftp", "rest", "swift", "azure", "gs", "rclone", "local")


def _check_restic_url(value: str) -> str:
    if value.startswith("/"):
        return value
    scheme, colon, rest = value.partition(":")
    if not colon or scheme not in _RESTIC_SCHEMES or not rest:
        raise ValueError(
            "must be a restic repository: s3:https://host/bucket/path, b2:bucket:path, "
            "sftp:user@host:/path, rest:https://..., rclone:remote:path or an absolute path"
        )
    return value


def _check_bucket(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", value):
        raise ValueError("must be an S3 bucket name (3-63 lowercase letters, digits, '-', '.')")
    return value


class S3(_Model):
    """S3 API (Backblaze B2 or another) for restic and for boto3."""

    endpoint: HttpUrl
    bucket: Annotated[str, AfterValidator(_check_bucket)]
    region: str | None = None
    access_key_id: Secret
    secret_access_key: Secret
    ca_file: AbsPath | None = None


def _check_restic_duration(value: str) -> str:
    if not re.fullmatch(r"(\d+[yYmdhH])+", value):
        raise ValueError("must be a restic duration like 2y5m7d3h")
    return value


class Retention(_Model):
    """restic forget policy (per backup series)."""

    keep_last: NonNegInt | None = None
    keep_hourly: NonNegInt | None = None
    keep_daily: NonNegInt | None = None
    keep_weekly: NonNegInt | None = None
    keep_monthly: NonNegInt | None = None
    keep_yearly: NonNegInt | None = None
    keep_within: Annotated[str, AfterValidator(_check_restic_duration)] | None = None

    @model_validator(mode="after")
    def _keeps(self) -> Retention:
        if not any(getattr(self, k) for k in type(self).model_fields):
            raise ValueError("a retention policy must keep something (every keep_* is 0/unset)")
        return self

    def restic_args(self) -> tuple[str, ...]:
        """``("--keep-last", "3", ...)`` for ``restic forget``."""
        args: list[str] = []
        for key in type(self).model_fields:
            value = getattr(self, key)
            if value:
                args += [f"--{key.replace('_', '-')}", str(value)]
        return tuple(args)


def _check_subset(value: str) -> str:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)%", value)
    if m and 0 < float(m.group(1)) <= 100:
        return value
    m = re.fullmatch(r"(\d+)/(\d+)", value)
    if m and 1 <= int(m.group(1)) <= int(m.group(2)):
        return value
    if re.fullmatch(r"\d+[KMGT]", value):
        return value
    raise ValueError("must be a percentage (5%), a fraction n/N or a size (500M)")


class CheckPolicy(_Model):
    """restic check, run by repo maintenance."""

    schedule: Cron = "0 4 * * 0"
    read_data_subset: Annotated[str, AfterValidator(_check_subset)] | None = "5%"


class Pricing(_Model):
    """Prices for the monthly cost estimate (B2 defaults, USD)."""

    storage_per_tb_month: Annotated[float, Field(ge=0)] = 6.0
    download_per_tb: Annotated[float, Field(ge=0)] = 10.0
    currency: str = "USD"


class Repository(_Model):
    name: Name
    url: Annotated[str, AfterValidator(_check_restic_url)]
    """Where the restic repository is: an absolute local path (``/srv/backup/restic``,
    a disk or NAS mount; run ``restic init`` there once; no credentials besides the
    password), ``s3:https://host/bucket/path`` (needs the ``s3`` section),
    ``b2:bucket:path``, ``sftp:user@host:/path``, ``rest:https://...`` or
    ``rclone:remote:path``."""
    password: Secret
    s3: S3 | None = None
    retention: Retention = Retention(keep_daily=7, keep_weekly=4, keep_monthly=12)
    check: CheckPolicy = CheckPolicy()
    maintenance_schedule: Cron = "0 3 * * 0"
    """forget + prune schedule."""
    compression: Literal["auto", "off", "max"] = "auto"
    cache_dir: AbsPath | None = None
    """Default: ``settings.cache_dir/<name>``."""
    lock_wait_minutes: Minutes = 30
    stale_lock_minutes: Minutes = 120
    pricing: Pricing = Pricing()

    @model_validator(mode="after")
    def _s3(self) -> Repository:
        if self.url.startswith("s3:"):
            if self.s3 is None:
                raise ValueError("an s3: repository needs an s3 section with the credentials")
            rest = self.url[3:]
            if "://" in rest:
                rest = rest.split("://", 1)[1]
            segments = rest.split("/")
            if len(segments) < 2 or segments[1] != self.s3.bucket:
                raise ValueError("the url's bucket is not s3.bucket")
        return self


# --------------------------------------------------------------------------------------
# vzdump jobs
# --------------------------------------------------------------------------------------


class Selection(_Model):
    """Which guests a job covers, resolved at run time against /cluster/resources:
    (vmids + guests + tags + pool, or all), limited to ``node``, minus the excludes."""

    all: bool = False
    vmids: list[VMID] = []
    guests: list[GuestName] = []
    tags: list[Tag] = []
    pool: PoolName | None = None
    node: NodeName | None = None
    exclude: list[VMID] = []
    exclude_tags: list[Tag] = []

    @model_validator(mode="after")
    def _something(self) -> Selection:
        picked = bool(self.vmids or self.guests or self.tags or self.pool)
        if self.all and picked:
            raise ValueError("all: true already selects every guest; drop vmids/guests/tags/pool")
        if not self.all and not picked and self.node is None:
            raise ValueError("select something: all, vmids, guests, tags, pool or node")
        both = set(self.vmids) & set(self.exclude)
        if both:
            raise ValueError(f"vmids both selected and excluded: {sorted(both)}")
        return self


class PruneRetention(_Model):
    """Proxmox prune-backups policy, per guest."""

    keep_all: bool = False
    keep_last: NonNegInt | None = None
    keep_hourly: NonNegInt | None = None
    keep_daily: NonNegInt | None = None
    keep_weekly: NonNegInt | None = None
    keep_monthly: NonNegInt | None = None
    keep_yearly: NonNegInt | None = None

    @model_validator(mode="after")
    def _keeps(self) -> PruneRetention:
        keeps = [k for k in type(self).model_fields if k != "keep_all" and getattr(self, k)]
        if self.keep_all and keeps:
            raise ValueError("keep_all excludes the other keep_* options")
        if not self.keep_all and not keeps:
            raise ValueError("a retention policy must keep something (or keep_all: true)")
        return self

    def as_pve(self) -> str:
        """The ``prune-backups`` property string: ``keep-daily=7,keep-weekly=4``."""
        if self.keep_all:
            return "keep-all=1"
        return ",".join(
            f"{k.replace('_', '-')}={getattr(self, k)}"
            for k in type(self).model_fields
            if k != "keep_all" and getattr(self, k)
        )


class Offsite(_Model):
    """Copy new archives off-site: to a repository's S3 bucket (streamed from the
    node over SFTP into a multipart upload) or to a path on an SSH host."""

    repository: Name | None = None
    """A repository with an ``s3`` section: copies go to its bucket."""
    host: GuestName | None = None
    """An SSH host (from ``hosts``, or a guest with ``ssh``) that only needs SFTP;
    copies go to ``path`` on it."""
    path: AbsPath | None = None
    """Directory on ``host``: each guest's copies in ``<path>/<vmid>/``, each with a
    ``<archive>.sha256`` sidecar (``sha256sum -c`` format)."""
    prefix: str = "vzdump/"
    """Object key prefix in the bucket (repository target)."""
    keep_last: PositiveInt = 2
    max_age_days: PositiveInt | None = None

    @model_validator(mode="after")
    def _target(self) -> Offsite:
        _exactly_one(self, ("repository", "host"), "offsite target")
        if self.host is not None and self.path is None:
            raise ValueError("an offsite host needs a path")
        if self.repository is not None and self.path is not None:
            raise ValueError("path is for an offsite host; use prefix for a repository")
        if self.host is not None and "prefix" in self.model_fields_set:
            raise ValueError("prefix is for a repository; an offsite host uses path")
        return self


_NOTES_VARS = frozenset({"cluster", "guestname", "node", "vmid"})


def _check_notes(value: str) -> str:
    for var in re.findall(r"\{\{\s*([^}]*?)\s*\}\}", value):
        if var not in _NOTES_VARS:
            raise ValueError(
                f"unknown notes variable {{{{{var}}}}}; use {{{{cluster}}}}, "
                "{{guestname}}, {{node}} or {{vmid}}"
            )
    return value


class VzdumpJob(_Model):
    name: Name
    selection: Selection
    storage: StorageName
    mode: Literal["snapshot", "suspend", "stop"] = "snapshot"
    compress: Annotated[Literal["zstd", "gzip", "lzo", "0"], BeforeValidator(_int_to_str)] = "zstd"
    retention: PruneRetention
    offsite: Offsite | None = None
    schedule: Cron
    max_per_node: Annotated[int, Field(ge=1, le=16)] = 1
    notes_template: Annotated[str, AfterValidator(_check_notes)] = "{{guestname}}"
    timeout_minutes: Minutes = 180
    min_size_ratio: Annotated[float, Field(ge=0, le=1)] = 0.5
    """A new archive smaller than this fraction of the previous one fails verification."""
    native: bool = False
    """Also mirror as a Proxmox /cluster/backup job (``labkeeper vzdump sync-jobs``)."""
    enabled: bool = True
    site: SiteName | None = None
    """The site whose worker runs this job (``settings.sites``)."""


# --------------------------------------------------------------------------------------
# apps
# --------------------------------------------------------------------------------------


class Gate(_Model):
    """Health gate after an update: wait ``initial_delay``, then require
    ``successes`` consecutive passing rounds before ``deadline`` (seconds)."""

    initial_delay: Annotated[float, Field(ge=0)] = 10
    interval: Seconds = 5
    deadline: Seconds = 300
    successes: Annotated[int, Field(ge=1, le=100)] = 3

    @model_validator(mode="after")
    def _order(self) -> Gate:
        if self.initial_delay >= self.deadline:
            raise ValueError("initial_delay must be shorter than deadline")
        return self


Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


class MaintenanceWindow(_Model):
    """When updates may run; ``end`` before ``start`` crosses midnight."""

    days: list[Weekday] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
    start: TimeOfDay
    end: TimeOfDay
    timezone: TimeZone | None = None
    """Default: lab.timezone."""


class AppCompose(_Model):
    dir: AbsPath
    project: Name | None = None
    file: RelPath = "compose.yaml"
    git_url: GitUrl | None = None
    docker_host: DockerHost | None = None
    """The engine's address when not the default socket (``docker --host``)."""
    pull: bool = True
    remove_orphans: bool = True


class AppApt(_Model):
    packages: list[PackageName] = []
    """Empty: full upgrade of the guest."""
    autoremove: bool = False


class AppCommands(_Model):
    update: list[Argv] = Field(min_length=1)
    version: Argv | None = None
    """Prints the installed version (recorded before/after)."""


class App(_Model):
    name: Name
    guest: GuestName
    strategy: Literal["compose", "apt", "commands"] = "compose"
    compose: AppCompose | None = None
    apt: AppApt | None = None
    commands: AppCommands | None = None
    health: list[Probe] = []
    gate: Gate = Gate()
    rollback: Literal["auto", "snapshot", "vzdump", "compose-images", "none"] = "auto"
    """auto: a guest snapshot when its storage supports snapshots, else a vzdump."""
    vzdump_storage: StorageName | None = None
    """Where pre-update vzdump backups go; default: the first backup storage on the node."""
    keep_snapshots: NonNegInt = 1
    maintenance_window: MaintenanceWindow | None = None
    databases: list[Name] = []
    """Backed up before every update."""
    tags: list[Tag] = []
    schedule: Cron | None = None
    """Update schedule; None: on demand only."""

    @model_validator(mode="after")
    def _strategy(self) -> App:
        block = {"compose": self.compose, "apt": self.apt, "commands": self.commands}
        if self.strategy in ("compose", "commands") and block[self.strategy] is None:
            raise ValueError(f"strategy {self.strategy} needs a {self.strategy} section")
        for other, value in block.items():
            if other != self.strategy and value is not None:
                raise ValueError(f"a {other} section does not fit strategy {self.strategy}")
        if self.rollback == "compose-images" and self.strategy != "compose":
            raise ValueError("rollback compose-images needs strategy compose")
        if any(p.container is not None for p in self.health) and self.strategy != "compose":
            raise ValueError("container probes need strategy compose")
        return self


# --------------------------------------------------------------------------------------
# path backups, notifications
# --------------------------------------------------------------------------------------


class HostS3Keys(_Model):
    access_key_id: Secret
    secret_access_key: Secret


class HostCredentials(_Model):
    """What a path set's host receives instead of the repository's own secrets: a
    restic key of its own (``restic key add``: revocable alone with ``restic key
    remove``) and, for an s3: repository, a bucket key of its own (e.g. a B2
    application key without deleteFiles). The controller keeps using the repository's
    credentials for its checks. See docs/ADMIN_GUIDE.md, "Path-backup hosts"."""

    password: Secret
    s3: HostS3Keys | None = None


class PathBackup(_Model):
    """A named set of paths backed up by restic running on ``host`` (issue 11)."""

    name: Name
    host: GuestName
    """A host, or a guest with an ssh section."""
    paths: list[AbsPath] = Field(min_length=1)
    excludes: list[str] = []
    exclude_caches: bool = True
    one_file_system: bool = False
    schedule: Cron = "30 2 * * *"
    repository: Name | None = None
    """Default: the only repository."""
    retention: Retention | None = None
    """Default: the repository's retention."""
    restic_binary: str = "restic"
    sudo: bool | Literal["restic"] = False
    """``true``: ``sudo -n -- sh -c ...`` (sudoers must allow sh, which is root);
    ``restic``: ``sudo -n --preserve-env=<names> -- <restic_binary> ...``, no shell
    under sudo (sudoers allows only restic and keeps those variables)."""
    host_credentials: HostCredentials | None = None
    """Default: the host gets the repository's own password and bucket keys."""
    timeout_minutes: Minutes = 24 * 60
    progress_interval: Seconds = 30
    site: SiteName | None = None
    """The site whose worker runs this set (``settings.sites``)."""


FlowName = Literal[
    "doctor", "pg_backup", "repo_maintenance", "vzdump", "provision", "update", "dr_drill",
    "runbook", "path_backup", "missing_backup",
]


class Healthchecks(_Model):
    """Dead-man's-switch pings (healthchecks.io style): ``/start``, success and
    ``/fail``. Each ping value resolves to a full URL, or to a check UUID/slug
    appended to ``base_url``."""

    base_url: HttpUrl | None = None
    pings: dict[FlowName, Secret] = {}
    timeout: Seconds = 10


NotifyEvent = Literal["failure", "rollback", "drill", "missing_backup", "success"]


class Notifications(_Model):
    apprise: list[Secret] = []
    """Apprise URLs (they carry tokens, so they are secret references)."""
    healthchecks: Healthchecks | None = None
    on: list[NotifyEvent] = ["failure", "rollback", "drill", "missing_backup"]
    missing_backup_schedule: Cron = "0 9 * * *"
    """When the dead-man's check looks for a backup within each RPO."""

    @model_validator(mode="before")
    @classmethod
    def _yaml11_on(cls, data: Any) -> Any:
        # A plain YAML 1.1 loader reads the key `on` as the boolean True.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data


# --------------------------------------------------------------------------------------
# the inventory
# --------------------------------------------------------------------------------------


class Inventory(_Model):
    version: Literal[1]
    lab: Lab
    settings: Settings = Settings()
    proxmox: Proxmox | None = None
    ssh: SshDefaults = SshDefaults()
    hosts: list[Host] = []
    guests: list[Guest] = []
    roles: dict[Name, Role] = {}
    databases: list[Database] = []
    repositories: list[Repository] = []
    vzdump_jobs: list[VzdumpJob] = []
    apps: list[App] = []
    path_backups: list[PathBackup] = []
    notifications: Notifications = Notifications()
    drills: Drills = Drills()
    pitr: list[PitrServer] = []

    @model_validator(mode="after")
    def _cross_references(self, info: ValidationInfo) -> Inventory:
        ctx = info.context
        inventory_sites.check(self)
        if isinstance(ctx, dict) and ctx.get(_SKIP_XREF_KEY):
            return self  # the loader checks them itself, with line numbers
        found = _cross_reference(_View.of_model(self))
        if found:
            raise ValueError(
                "; ".join(f"{format_path(loc)}: {message}" for loc, message in found)
            )
        return self

    # ---- look-ups ------------------------------------------------------------------

    def guest(self, name_or_vmid: str | int) -> Guest:
        for g in self.guests:
            if g.name == name_or_vmid or g.vmid == name_or_vmid:
                return g
        if isinstance(name_or_vmid, str) and name_or_vmid.isdigit():
            return self.guest(int(name_or_vmid))
        raise _not_found("guest", name_or_vmid, [g.name for g in self.guests])

    def host(self, name: str) -> Host:
        return _by_name(self.hosts, name, "host")

    def database(self, name: str) -> Database:
        return _by_name(self.databases, name, "database")

    def repository(self, name: str) -> Repository:
        return _by_name(self.repositories, name, "repository")

    def app(self, name: str) -> App:
        return _by_name(self.apps, name, "app")

    def vzdump_job(self, name: str) -> VzdumpJob:
        return _by_name(self.vzdump_jobs, name, "vzdump job")

    def path_backup(self, name: str) -> PathBackup:
        return _by_name(self.path_backups, name, "path backup")

    def node(self, name: str) -> Node:
        if self.proxmox is None:
            raise ConfigError("the inventory has no proxmox section")
        return _by_name(self.proxmox.nodes, name, "node")

    def storage(self, name: str) -> Storage:
        if self.proxmox is None:
            raise ConfigError("the inventory has no proxmox section")
        return _by_name(self.proxmox.storages, name, "storage")

    def role(self, name: str) -> Role:
        if name not in self.roles:
            raise _not_found("role", name, list(self.roles))
        return self.roles[name]

    def drill_server(self, name: str) -> DrillServer:
        for s in self.drills.servers:
            if s.name == name:
                return s
        if name == LOCAL_DRILL_SERVER:
            return DrillServer(name=LOCAL_DRILL_SERVER)
        raise _not_found("drill server", name, [s.name for s in self.drills.servers])

    def repository_for(self, item: Database | PathBackup) -> Repository:
        """The repository a database or path set backs up to (default: the only one)."""
        if item.repository is not None:
            return self.repository(item.repository)
        if len(self.repositories) == 1:
            return self.repositories[0]
        raise ConfigError(f"{item.name}: no repository named and not exactly one declared")

    def retention_for(self, item: Database | PathBackup) -> Retention:
        if isinstance(item, PathBackup) and item.retention is not None:
            return item.retention
        return self.repository_for(item).retention

    def database_address(self, db: Database | str) -> tuple[str, int]:
        """``(host, port)`` of a database, resolving ``guest:`` to the guest's address."""
        db = self.database(db) if isinstance(db, str) else db
        if db.container is not None:
            return db.container.pghost, db.port
        if db.host is not None:
            return db.host, db.port
        address = self.guest(db.guest or "").address
        if address is None:
            raise ConfigError(f"database {db.name}: guest {db.guest} has no address")
        return address, db.port

    def database_server(self, db: Database | str) -> str:
        """The server label used in backup tags (``db:<server>/<name>``)."""
        db = self.database(db) if isinstance(db, str) else db
        base = db.guest or db.host or "unknown"
        return f"{base}/{db.container.name}" if db.container is not None else base

    def rollback_mode(
        self, app: App | str
    ) -> Literal["snapshot", "vzdump", "compose-images", "none"]:
        """Resolve ``auto``: a snapshot when the guest's storage supports them, else vzdump."""
        app = self.app(app) if isinstance(app, str) else app
        if app.rollback != "auto":
            return app.rollback
        guest = self.guest(app.guest)
        storage = self.storage(guest.resources.storage)
        return "snapshot" if storage.supports_snapshots else "vzdump"

    def known_hosts_path(self) -> Path:
        return self.ssh.known_hosts or self.settings.known_hosts

    def ssh_targets(self) -> dict[str, SshTargetSpec]:
        """Every SSH target with defaults merged: each host, and each present guest
        that has an ``ssh`` section (address defaults to its first static IP)."""
        d = self.ssh
        known = self.known_hosts_path()
        out: dict[str, SshTargetSpec] = {}
        for h in self.hosts:
            out[h.name] = SshTargetSpec(
                name=h.name,
                kind="host",
                address=h.address,
                port=h.port or d.port,
                user=h.user or d.user,
                key=h.key or d.key,
                known_hosts=known,
                trust_on_first_use=_first(h.trust_on_first_use, d.trust_on_first_use),
                host_key=h.host_key,
                connect_timeout=h.connect_timeout or d.connect_timeout,
                command_timeout=d.command_timeout,
            )
        for g in self.guests:
            if g.ssh is None or g.state != "present" or g.address is None:
                continue
            s = g.ssh
            out[g.name] = SshTargetSpec(
                name=g.name,
                kind="guest",
                address=g.address,
                port=s.port or d.port,
                user=s.user or d.user,
                key=s.key or d.key,
                known_hosts=known,
                trust_on_first_use=_first(s.trust_on_first_use, d.trust_on_first_use),
                host_key=s.host_key,
                connect_timeout=s.connect_timeout or d.connect_timeout,
                command_timeout=d.command_timeout,
                vmid=g.vmid,
            )
        return out

    def ssh_target(self, name: str) -> SshTargetSpec:
        targets = self.ssh_targets()
        if name not in targets:
            raise _not_found("SSH target", name, list(targets))
        return targets[name]

    def secret_refs(self) -> list[str]:
        """Every secret reference in the inventory, in document order, without repeats."""
        seen: dict[str, None] = {}
        for ref in _secret_values(self):
            seen.setdefault(ref, None)
        return list(seen)


def _first(value: bool | None, default: bool) -> bool:
    return default if value is None else value


def _by_name(items: Iterable[Any], name: str, kind: str) -> Any:
    items = list(items)
    for item in items:
        if item.name == name:
            return item
    raise _not_found(kind, name, [i.name for i in items])


def _not_found(kind: str, name: object, known: Sequence[str]) -> ConfigError:
    hint = _did_you_mean(str(name), known)
    listing = ", ".join(known) if known else "none declared"
    return ConfigError(f"no {kind} {name!r} in the inventory{hint} (known: {listing})")


def _did_you_mean(value: str, known: Iterable[str]) -> str:
    matches = difflib.get_close_matches(value, [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {matches[0]!r}?)" if matches else ""


# ---- secret_refs: walk values alongside their annotations ---------------------------


def _is_secret_annotation(metadata: Iterable[Any]) -> bool:
    return any(
        isinstance(m, AfterValidator) and m.func is check_reference for m in metadata
    )


def _secret_values(model: BaseModel) -> Iterator[str]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        if _is_secret_annotation(info.metadata):
            if isinstance(value, str):
                yield value
            continue
        yield from _secrets_in(value, info.annotation)


def _secrets_in(value: Any, annotation: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, BaseModel):
        yield from _secret_values(value)
        return
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *metadata = typing.get_args(annotation)
        if _is_secret_annotation(metadata):
            if isinstance(value, str):
                yield value
            return
        yield from _secrets_in(value, base)
    elif origin in (Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                yield from _secrets_in(value, arg)
    elif origin in (list, tuple) and isinstance(value, (list, tuple)):
        (arg, *_) = typing.get_args(annotation)
        for item in value:
            yield from _secrets_in(item, arg)
    elif origin is dict and isinstance(value, dict):
        arg = typing.get_args(annotation)[1]
        for item in value.values():
            yield from _secrets_in(item, arg)


# --------------------------------------------------------------------------------------
# Cross-reference checks. They run on a *view*: the items that validated (so a bad item
# is reported once, by the schema) and the names the document declares (so an item that
# failed validation does not also cause "unknown X" errors elsewhere).
# --------------------------------------------------------------------------------------

Loc = tuple[str | int, ...]


@dataclass
class _View:
    proxmox: Proxmox | None = None
    ssh: SshDefaults | None = None
    hosts: list[tuple[int, Host]] = field(default_factory=list)
    guests: list[tuple[int, Guest]] = field(default_factory=list)
    roles: dict[str, Role] = field(default_factory=dict)
    databases: list[tuple[int, Database]] = field(default_factory=list)
    repositories: list[tuple[int, Repository]] = field(default_factory=list)
    vzdump_jobs: list[tuple[int, VzdumpJob]] = field(default_factory=list)
    apps: list[tuple[int, App]] = field(default_factory=list)
    path_backups: list[tuple[int, PathBackup]] = field(default_factory=list)
    drills: Drills | None = None
    storages: list[tuple[int, Storage]] = field(default_factory=list)
    known: dict[str, set[Any]] = field(default_factory=dict)
    has_proxmox: bool = False
    bad: set[Loc] = field(default_factory=set)
    """Locations of schema errors: checks under them are suppressed."""

    def bad_fields(self, loc: Loc) -> set[str | int]:
        """Names of the direct children of ``loc`` that failed validation."""
        n = len(loc)
        return {b[n] for b in self.bad if len(b) > n and b[:n] == loc}

    def suppressed(self, loc: Loc) -> bool:
        return any(loc[: len(b)] == b for b in self.bad)

    @classmethod
    def of_model(cls, inv: Inventory) -> _View:
        view = cls(
            proxmox=inv.proxmox,
            ssh=inv.ssh,
            hosts=list(enumerate(inv.hosts)),
            guests=list(enumerate(inv.guests)),
            roles=dict(inv.roles),
            databases=list(enumerate(inv.databases)),
            repositories=list(enumerate(inv.repositories)),
            vzdump_jobs=list(enumerate(inv.vzdump_jobs)),
            apps=list(enumerate(inv.apps)),
            path_backups=list(enumerate(inv.path_backups)),
            drills=inv.drills,
            storages=list(enumerate(inv.proxmox.storages)) if inv.proxmox else [],
            has_proxmox=inv.proxmox is not None,
        )
        nodes = [n.name for n in inv.proxmox.nodes] if inv.proxmox else []
        view.known = {
            "node": set(nodes),
            "storage": {s.name for _, s in view.storages},
            "guest": {g.name for g in inv.guests},
            "vmid": {g.vmid for g in inv.guests},
            "host": {h.name for h in inv.hosts},
            "role": set(inv.roles),
            "database": {d.name for d in inv.databases},
            "repository": {r.name for r in inv.repositories},
            "drill_server": {s.name for s in inv.drills.servers},
        }
        return view

    @classmethod
    def of_data(cls, data: dict[str, Any]) -> _View:
        """Validate each part on its own; an item that does not validate is kept as a
        partial object whose invalid fields are None (they are reported by the schema
        and the checks on them are suppressed)."""
        view = cls()

        def one(key: str, model: type[_Model]) -> Any:
            return _partial(model, data[key]) if key in data else model()

        def many(value: Any, model: type[_Model]) -> list[tuple[int, Any]]:
            out: list[tuple[int, Any]] = []
            if isinstance(value, list):
                for i, item in enumerate(value):
                    obj = _partial(model, item)
                    if obj is not None:
                        out.append((i, obj))
            return out

        proxmox = data.get("proxmox")
        view.has_proxmox = proxmox is not None
        view.proxmox = _partial(Proxmox, proxmox) if proxmox is not None else None
        view.ssh = one("ssh", SshDefaults)
        pdata = proxmox if isinstance(proxmox, dict) else {}
        view.storages = many(pdata.get("storages"), Storage)
        view.hosts = many(data.get("hosts"), Host)
        view.guests = many(data.get("guests"), Guest)
        roles = data.get("roles")
        if isinstance(roles, dict):
            for name, role in roles.items():
                obj = _partial(Role, role)
                if obj is not None:
                    view.roles[name] = obj
        view.databases = many(data.get("databases"), Database)
        view.repositories = many(data.get("repositories"), Repository)
        view.vzdump_jobs = many(data.get("vzdump_jobs"), VzdumpJob)
        view.apps = many(data.get("apps"), App)
        view.path_backups = many(data.get("path_backups"), PathBackup)
        view.drills = one("drills", Drills)
        ddata = data.get("drills")
        servers = ddata.get("servers") if isinstance(ddata, dict) else None
        view.known = {
            "node": _raw_values(pdata.get("nodes"), "name"),
            "storage": _raw_values(pdata.get("storages"), "name"),
            "guest": _raw_values(data.get("guests"), "name"),
            "vmid": _raw_values(data.get("guests"), "vmid"),
            "host": _raw_values(data.get("hosts"), "name"),
            "role": set(roles) if isinstance(roles, dict) else set(),
            "database": _raw_values(data.get("databases"), "name"),
            "repository": _raw_values(data.get("repositories"), "name"),
            "drill_server": _raw_values(servers, "name"),
        }
        return view


_FIELD_ADAPTERS: dict[tuple[type, str], TypeAdapter[Any]] = {}


def _model_in(annotation: Any) -> type[_Model] | None:
    """The model class of ``X`` or ``X | None``."""
    if isinstance(annotation, type) and issubclass(annotation, _Model):
        return annotation
    if typing.get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _model_in(args[0])
    return None


def _partial(cls: type[_Model], raw: Any) -> Any:
    """``cls`` validated from ``raw``; failing that, a partial object built field by
    field (invalid or missing required fields are None; nested models recurse)."""
    try:
        return cls.model_validate(raw)
    except ValidationError:
        pass
    if not isinstance(raw, dict):
        return None
    values: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name not in raw:
            required = info.is_required()
            values[name] = None if required else info.get_default(call_default_factory=True)
            continue
        adapter = _FIELD_ADAPTERS.get((cls, name))
        if adapter is None:
            adapter = _FIELD_ADAPTERS[(cls, name)] = TypeAdapter(info.rebuild_annotation())
        try:
            values[name] = adapter.validate_python(raw[name])
        except ValidationError:
            sub = _model_in(info.annotation)
            values[name] = _partial(sub, raw[name]) if sub is not None else None
    return cls.model_construct(**values)


def _raw_values(items: Any, key: str) -> set[Any]:
    out: set[Any] = set()
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                value = item.get(key)
                if isinstance(value, (str, int)) and not isinstance(value, bool):
                    out.add(value)
    return out


def _unknown(kind: str, value: str, known: Iterable[Any], where: str = "") -> str:
    names = sorted(str(k) for k in known)
    hint = _did_you_mean(value, names)
    place = f" in {where}" if where else ""
    return f"unknown {kind} {value!r}{place}{hint}"


def _cross_reference(v: _View) -> list[tuple[Loc, str]]:
    """Every reference between parts of the inventory, checked. Fields that are None
    because they failed validation are skipped (the caller filters problems under
    invalid fields)."""
    out: list[tuple[Loc, str]] = []
    add = out.append
    known = v.known

    # -- unique names / vmids -----------------------------------------------------------
    def unique(section: str, items: list[tuple[int, Any]], attr: str, what: str,
               prefix: Loc = ()) -> None:
        seen: dict[Any, int] = {}
        for i, item in items:
            value = getattr(item, attr)
            if value is None:
                continue
            if value in seen:
                first = format_path((*prefix, section, seen[value]))
                add(((*prefix, section, i, attr),
                     f"duplicate {what} {value!r} (already used by {first})"))
            else:
                seen[value] = i

    unique("guests", v.guests, "name", "guest name")
    unique("guests", v.guests, "vmid", "vmid")
    unique("hosts", v.hosts, "name", "host name")
    unique("databases", v.databases, "name", "database name")
    unique("repositories", v.repositories, "name", "repository name")
    unique("vzdump_jobs", v.vzdump_jobs, "name", "vzdump job name")
    unique("apps", v.apps, "name", "app name")
    unique("path_backups", v.path_backups, "name", "path backup name")
    unique("storages", v.storages, "name", "storage name", ("proxmox",))
    if v.proxmox is not None and v.proxmox.nodes:
        unique("nodes", list(enumerate(v.proxmox.nodes)), "name", "node name", ("proxmox",))
    if v.drills is not None and v.drills.servers:
        unique("servers", list(enumerate(v.drills.servers)), "name", "drill server name",
               ("drills",))

    host_names = {h.name: i for i, h in v.hosts if h.name is not None}
    for i, g in v.guests:
        if g.name in host_names:
            add((("guests", i, "name"),
                 f"name {g.name!r} is also used by hosts[{host_names[g.name]}]; "
                 "SSH targets need unique names"))

    # -- static IPs --------------------------------------------------------------------
    ips: dict[str, Loc] = {}
    for i, g in v.guests:
        if g.state == "absent":
            continue
        for n, nic in enumerate(g.network or ()):
            ip = nic.static_ip
            if ip is None:
                continue
            loc: Loc = ("guests", i, "network", n, "ip")
            if ip in ips:
                add((loc, f"address {ip} is already used by {format_path(ips[ip][:2])}"))
            else:
                ips[ip] = loc

    # -- proxmox: nodes and storages ---------------------------------------------------
    storages = {s.name: s for _, s in v.storages if s.name is not None}
    for i, s in v.storages:
        for n, node in enumerate(s.nodes or ()):
            if node not in known["node"]:
                add((("proxmox", "storages", i, "nodes", n),
                     _unknown("node", node, known["node"], "proxmox.nodes")))
    if v.guests and not v.has_proxmox:
        add((("guests",), "guests are declared but there is no proxmox section"))

    def check_storage(loc: Loc, name: str | None, node: str | None, content: str,
                      why: str) -> None:
        if name is None:
            return
        if name not in known["storage"]:
            add((loc, _unknown("storage", name, known["storage"], "proxmox.storages")))
            return
        s = storages.get(name)
        if s is None or s.content is None:
            return  # declared but invalid: reported by the schema
        if node is not None and node in known["node"] and not s.available_on(node):
            add((loc, f"storage {name!r} is not available on node {node!r} "
                      f"(it is on: {', '.join(s.nodes)})"))
        if content not in s.content:
            add((loc, f"storage {name!r} cannot hold {why} (its content lacks {content!r})"))

    # -- guests ------------------------------------------------------------------------
    ssh_names = set(host_names) | {g.name for _, g in v.guests
                                   if g.ssh is not None and g.state == "present"}
    default_key = v.ssh.key if v.ssh is not None else None
    for i, g in v.guests:
        if g.node is not None and g.node not in known["node"]:
            add((("guests", i, "node"), _unknown("node", g.node, known["node"], "proxmox.nodes")))
        if g.state == "present":
            content = {"lxc": "rootdir", "qemu": "images"}.get(g.type or "")
            if g.resources is not None and content is not None:
                check_storage(("guests", i, "resources", "storage"), g.resources.storage, g.node,
                              content, f"{g.type} disks")
            check_storage(("guests", i, "template"), g.template_storage, g.node, "vztmpl",
                          "container templates")
        for r, role in enumerate(g.roles or ()):
            if role not in known["role"]:
                add((("guests", i, "roles", r), _unknown("role", role, known["role"], "roles")))
        if g.roles and g.ssh is None and "ssh" not in v.bad_fields(("guests", i)):
            add((("guests", i, "roles"), "roles are applied over SSH: add an ssh section"))
        if g.ssh is not None:
            if g.address is None and not _address_unknown(v, i):
                add((("guests", i, "ssh"),
                     "no address: set ssh.address or give a NIC a static ip"))
            if g.ssh.key is None and default_key is None:
                add((("guests", i, "ssh"),
                     "no SSH key: set ssh.key (the defaults) or ssh.key here"))
        for d, dep in enumerate(g.depends_on or ()):
            if dep not in known["guest"] and dep not in known["host"]:
                add((("guests", i, "depends_on", d),
                     _unknown("guest or host", dep, known["guest"] | known["host"])))
    for i, h in v.hosts:
        if h.key is None and default_key is None:
            add((("hosts", i), "no SSH key: set ssh.key (the defaults) or key here"))
    out.extend(_dependency_cycles(v))

    # -- databases -----------------------------------------------------------------------
    guests_by_name: dict[str, Guest] = {}
    guest_index: dict[str, int] = {}
    for i, g in v.guests:  # the first of duplicated names wins (the others are reported)
        if g.name is not None and g.name not in guests_by_name:
            guests_by_name[g.name], guest_index[g.name] = g, i
    drill_servers = known["drill_server"] | {LOCAL_DRILL_SERVER}
    n_repos = len(known["repository"])

    def check_repo(loc: Loc, name: str | None, need_s3: bool = False) -> None:
        if name is None:
            if n_repos != 1:
                add((loc, "repository is required: the inventory declares "
                          f"{n_repos} repositories, not exactly one"))
            return
        if name not in known["repository"]:
            add((loc, _unknown("repository", name, known["repository"], "repositories")))
            return
        if need_s3:
            for _, r in v.repositories:
                if r.name == name and r.url is not None and r.s3 is None:
                    add((loc, f"repository {name!r} has no s3 section (off-site copies "
                              "go to its S3 bucket)"))

    def check_guest_ref(loc: Loc, name: str | None, need: str) -> Guest | None:
        if name is None:
            return None
        if name not in known["guest"]:
            add((loc, _unknown("guest", name, known["guest"], "guests")))
            return None
        g = guests_by_name.get(name)
        if g is None:
            return None
        if g.state == "absent":
            add((loc, f"guest {name!r} is marked absent"))
        elif need == "address" and g.address is None and not _address_unknown(v, guest_index[name]):
            add((loc, f"guest {name!r} has no static address (set its ssh.address or a static ip)"))
        elif need == "ssh" and g.ssh is None:
            add((loc, f"guest {name!r} has no ssh section"))
        return g

    for i, db in v.databases:
        check_guest_ref(("databases", i, "guest"), db.guest,
                        "ssh" if db.container is not None else "address")
        if db.container is not None and db.host is not None \
                and db.host not in ssh_names and db.host != LOCAL_DOCKER_HOST:
            add((("databases", i, "host"),
                 _unknown("SSH host", db.host, ssh_names, "hosts or guests with ssh")
                 + f" (with container, host names where docker runs; "
                   f"{LOCAL_DOCKER_HOST!r}: this worker)"))
        if "repository" not in v.bad_fields(("databases", i)):
            check_repo(("databases", i, "repository"), db.repository)
        server = db.drill.server if db.drill is not None else None
        if server is not None and server not in drill_servers:
            add((("databases", i, "drill", "server"),
                 _unknown("drill server", server, drill_servers, "drills.servers")))

    # -- drills --------------------------------------------------------------------------
    if v.drills is not None:
        for i, s in enumerate(v.drills.servers or ()):
            check_guest_ref(("drills", "servers", i, "guest"), s.guest, "address")
        gd = v.drills.guests
        rng = gd.scratch_vmids if gd is not None else None
        if rng is not None and rng.first is not None and rng.last is not None:
            for i, g in v.guests:
                if g.vmid is not None and g.vmid in rng:
                    add((("guests", i, "vmid"),
                         f"vmid {g.vmid} is inside drills.guests.scratch_vmids "
                         f"({rng.first}-{rng.last}), where drills restore scratch guests"))
        if gd is not None:
            if gd.node is not None and gd.node not in known["node"]:
                add((("drills", "guests", "node"), _unknown("node", gd.node, known["node"])))
            check_storage(("drills", "guests", "storage"), gd.storage, gd.node, "images",
                          "restored guests")
        repo_drill = v.drills.repository
        for r, name in enumerate(repo_drill.repositories or () if repo_drill else ()):
            if name not in known["repository"]:
                add((("drills", "repository", "repositories", r),
                     _unknown("repository", name, known["repository"])))

    # -- vzdump jobs ---------------------------------------------------------------------
    for i, job in v.vzdump_jobs:
        sel = job.selection
        check_storage(("vzdump_jobs", i, "storage"), job.storage,
                      sel.node if sel is not None else None, "backup", "vzdump archives")
        if sel is not None:
            for key in ("vmids", "exclude"):
                for n, vmid in enumerate(getattr(sel, key) or ()):
                    if vmid not in known["vmid"]:
                        add((("vzdump_jobs", i, "selection", key, n),
                             f"vmid {vmid} is not a guest in the inventory"))
            for n, name in enumerate(sel.guests or ()):
                if name not in known["guest"]:
                    add((("vzdump_jobs", i, "selection", "guests", n),
                         _unknown("guest", name, known["guest"])))
            if sel.node is not None and sel.node not in known["node"]:
                add((("vzdump_jobs", i, "selection", "node"),
                     _unknown("node", sel.node, known["node"])))
        off = job.offsite
        if off is not None:
            if off.repository is not None:
                check_repo(("vzdump_jobs", i, "offsite", "repository"), off.repository,
                           need_s3=True)
            if off.host is not None and off.host not in ssh_names:
                add((("vzdump_jobs", i, "offsite", "host"),
                     _unknown("SSH host", off.host, ssh_names, "hosts or guests with ssh")))

    # -- apps ----------------------------------------------------------------------------
    for i, app in v.apps:
        g = check_guest_ref(("apps", i, "guest"), app.guest, "ssh")
        for n, name in enumerate(app.databases or ()):
            if name not in known["database"]:
                add((("apps", i, "databases", n),
                     _unknown("database", name, known["database"], "databases")))
        check_storage(("apps", i, "vzdump_storage"), app.vzdump_storage,
                      g.node if g else None, "backup", "vzdump archives")
        if g is None or g.resources is None:
            continue
        s = storages.get(g.resources.storage or "")
        if s is not None and s.content is not None and g.node is not None:
            if app.rollback == "snapshot" and not s.supports_snapshots:
                add((("apps", i, "rollback"),
                     f"guest {g.name!r} is on storage {s.name!r}, which has no snapshots "
                     "(use auto or vzdump)"))
            needs_vzdump = app.rollback == "vzdump" or (
                app.rollback == "auto" and not s.supports_snapshots
            )
            if needs_vzdump and app.vzdump_storage is None and not any(
                st.content and "backup" in st.content and st.available_on(g.node)
                for st in storages.values()
            ):
                add((("apps", i, "rollback"),
                     f"a vzdump rollback needs a backup storage on node {g.node!r}: "
                     "declare one or set vzdump_storage"))
        for p, probe in enumerate(app.health or ()):
            if probe.tcp is not None and probe.tcp.host is None and g.address is None:
                add((("apps", i, "health", p, "tcp", "host"),
                     f"guest {g.name!r} has no address: set host"))

    # -- path backups ----------------------------------------------------------------------
    for i, pb in v.path_backups:
        if pb.host is not None and pb.host not in ssh_names:
            add((("path_backups", i, "host"),
                 _unknown("SSH host", pb.host, ssh_names, "hosts or guests with ssh")))
        if "repository" not in v.bad_fields(("path_backups", i)):
            check_repo(("path_backups", i, "repository"), pb.repository)

    return out


def _address_unknown(v: _View, guest: int) -> bool:
    """The guest's address cannot be known: its network or ssh failed validation."""
    return bool({"network", "ssh"} & v.bad_fields(("guests", guest)))


def _dependency_cycles(v: _View) -> list[tuple[Loc, str]]:
    deps = {g.name: list(g.depends_on or ()) for _, g in v.guests if g.name is not None}
    index = {g.name: i for i, g in v.guests}
    state: dict[str, int] = {}
    out: list[tuple[Loc, str]] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in deps.get(name, []):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                out.append((("guests", index[dep], "depends_on"),
                            f"dependency cycle: {' -> '.join(cycle)}"))
            elif dep in deps and dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in deps:
        if name not in state:
            visit(name, [name])
    return out


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def problems_report(problems: Sequence[Problem], *, source: str | None = None) -> str:
    """Every problem, one a line, under a count — what ``labkeeper validate`` prints."""
    name = source or (problems[0].file if problems else "inventory")
    if not problems:
        return f"{name}: valid"
    n = len(problems)
    lines = [f"{name}: {n} problem{'s' if n != 1 else ''}"]
    lines += [f"  {p}" for p in problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Schema errors -> problems
# --------------------------------------------------------------------------------------


def _data_path(data: Any, loc: Sequence[Any], keep_last: bool) -> tuple[Loc, Any]:
    """Map a pydantic loc onto the document: drop parts that are not in the data
    (union tags, validator names). Returns the path and the parent container."""
    parts = list(loc)
    last = parts.pop() if keep_last and parts else None
    node = data
    out: list[str | int] = []
    parent: Any = None
    for part in parts:
        if isinstance(node, dict) and part in node:
            parent, node = node, node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parent, node = node, node[part]
            out.append(part)
    if last is not None:
        out.append(last)
        parent = node
    return tuple(out), parent


def _message(err: Any, key: Any, parent: Any, ctx: dict[str, Any]) -> str:
    typ = err["type"]
    c = err.get("ctx") or {}
    if typ == "missing":
        return "required field is missing"
    if typ == "extra_forbidden":
        fields = ctx.get(_FIELDS_KEY, {}).get(id(parent), ())
        hint = _did_you_mean(str(key), fields)
        shown = str(key) if len(str(key)) <= 40 else str(key)[:37] + "..."
        return f"unknown key {shown!r}{hint}"
    simple = {
        "greater_than_equal": "must be ≥ {ge}",
        "less_than_equal": "must be ≤ {le}",
        "greater_than": "must be > {gt}",
        "less_than": "must be < {lt}",
        "literal_error": "must be one of {expected}",
        "string_pattern_mismatch": "must match {pattern}",
    }
    if typ in simple:
        return simple[typ].format(**c)
    if typ in ("value_error", "assertion_error"):
        return str(c.get("error", err["msg"]))
    if typ in ("int_type", "int_parsing"):
        return "must be an integer"
    if typ == "int_from_float":
        return "must be a whole number"
    if typ in ("float_type", "float_parsing"):
        return "must be a number"
    if typ in ("bool_type", "bool_parsing"):
        return "must be true or false"
    if typ == "string_type":
        return "must be a string"
    if typ == "list_type":
        return "must be a list"
    if typ in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping"
    if typ in ("path_type",):
        return "must be a path"
    if typ == "too_short":
        n = c.get("min_length", 1)
        return f"must have at least {n} item{'s' if n != 1 else ''}"
    if typ == "too_long":
        return f"must have at most {c.get('max_length')} items"
    if typ == "string_too_short":
        return "must not be empty"
    if typ == "string_too_long":
        return f"must be at most {c.get('max_length')} characters"
    return str(err["msg"])


def _schema_problems(exc: ValidationError, doc: _Document, ctx: dict[str, Any]) -> list[Problem]:
    problems = []
    for err in exc.errors(include_url=False, include_input=False):
        keep_last = err["type"] == "missing"
        loc, parent = _data_path(doc.data, err["loc"], keep_last)
        key = loc[-1] if loc else None
        message = _message(err, key, parent, ctx)
        problems.append(Problem(doc.filename, doc.line_of(loc), format_path(loc), message, loc))
    return problems


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _check_document(text: str, filename: str) -> tuple[Inventory | None, list[Problem]]:
    doc = _Document(text, filename)
    problems = list(doc.problems)
    if doc.data is None and problems:
        return None, problems
    if not isinstance(doc.data, dict):
        problems.append(
            Problem(filename, 1, "", "the top level must be a mapping (version: 1, lab: ...)")
        )
        return None, problems
    ctx: dict[str, Any] = {_SKIP_XREF_KEY: True}
    inventory: Inventory | None = None
    try:
        inventory = Inventory.model_validate(doc.data, context=ctx)
    except ValidationError as exc:
        # a value the YAML layer already reported (as None) is not reported twice
        reported = {p.loc for p in doc.problems}
        problems += [p for p in _schema_problems(exc, doc, ctx) if p.loc not in reported]
    view = _View.of_model(inventory) if inventory is not None else _View.of_data(doc.data)
    view.bad = {p.loc for p in problems if p.loc}
    for loc, message in _cross_reference(view):
        if view.suppressed(loc):
            continue
        problems.append(Problem(filename, doc.line_of(loc), format_path(loc), message, loc))
    problems = _dedupe(problems)
    problems.sort(key=lambda p: (p.line or 0))
    return (inventory if not problems else None), problems


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen: set[tuple[Any, ...]] = set()
    out = []
    for p in problems:
        key = (p.line, p.path, p.message)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def validate_text(text: str, filename: str = "<inventory>") -> list[Problem]:
    """Every problem in an inventory given as text (empty list: valid)."""
    return _check_document(text, filename)[1]


def validate_file(path: str | Path) -> list[Problem]:
    """Every problem in an inventory file (empty list: valid)."""
    try:
        text = read_source(path)
    except UnreadableFile as exc:
        return [exc.problem]
    return validate_text(text, str(path))


def parse_inventory(text: str, filename: str = "<inventory>") -> Inventory:
    """Parse and validate inventory text; raise :class:`ConfigError` listing every problem."""
    inventory, problems = _check_document(text, filename)
    if inventory is None or problems:
        n = len(problems)
        raise ConfigError(
            f"{filename}: {n} problem{'s' if n != 1 else ''} in the inventory",
            problems=[str(p) for p in problems],
        )
    return inventory


def load_inventory(path: str | Path) -> Inventory:
    """Load and validate an inventory file; raise :class:`ConfigError` listing every problem."""
    try:
        text = read_source(path)
    except UnreadableFile as exc:
        raise ConfigError(f"{path}: cannot read the inventory",
                          problems=[str(exc.problem)]) from None
    return parse_inventory(text, str(path))
