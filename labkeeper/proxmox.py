"""Typed Proxmox VE operations on proxmoxer's HTTPS backend.

TLS is always verified: by the system CA store, by a CA file, or by a pinned
SHA-256 certificate fingerprint (what PVE shows under Certificates). There is
no way to turn verification off silently.

Shape of this module (pure code apart from one thin layer):

* ``*_request(...)`` functions build an :class:`ApiRequest` (method, path
  template, path values, parameters) — pure, unit-tested;
* :func:`send` is the only place that talks to proxmoxer; :func:`call` types
  its failures: 5xx (except 501) and connection resets/timeouts are transient,
  4xx and 501 permanent, ``CT is locked (backup)`` / ``VM is locked (...)`` is a
  transient :class:`GuestLocked` carrying the lock name;
* responses are read into tolerant pydantic models (``extra="ignore"``);
* operations that PVE runs as tasks return a parsed :class:`Upid`;
  :func:`wait_for_task` is the one place that waits on one.

Volume IDs, UPIDs and every other path value are percent-encoded in URL paths
(proxmoxer does not encode; real PVE expects encoded values, as its web UI sends).

:data:`REQUIRED_PRIVILEGES` is the least-privilege role for a labkeeper API token,
derived by :func:`derive_privileges` from the structure file for
:data:`ADAPTER_CALLS` (a test keeps the two equal).
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Concatenate, Literal, ParamSpec, Protocol, TypeVar
from urllib.parse import quote

import requests
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from requests.adapters import HTTPAdapter

from labkeeper.errors import ConfigError, LabkeeperError, ServiceError, TaskTimeout
from labkeeper.secrets import redact, resolve

GuestType = Literal["lxc", "qemu"]
Method = Literal["GET", "POST", "PUT", "DELETE"]


class ProxmoxSpec(Protocol):
    """What the adapter needs from the inventory's ``proxmox`` section."""

    host: str
    port: int
    token_id: str
    token_secret: str
    timeout: int
    tls: Any


# ====================================================================== errors


class GuestLocked(ServiceError):
    """PVE refused a call because the guest holds a lock (``CT is locked (backup)``).

    Transient: the lock goes away when the backup/snapshot/rollback finishes.
    """

    def __init__(self, message: str, *, lock: str, status: int | None = None) -> None:
        super().__init__(message, service="proxmox", status=status, transient=True)
        self.lock = lock


class ProxmoxTaskError(LabkeeperError):
    """A PVE task ended with an error ``exitstatus`` (``job errors``, ...).

    Carries the UPID, the exit status and the tail of the task log (redacted).
    Transient only when the failure was a lock held by someone else.
    """

    def __init__(self, message: str, *, upid: str, exitstatus: str, log_tail: Sequence[str],
                 transient: bool = False) -> None:
        super().__init__(message, transient=transient)
        self.upid = upid
        self.exitstatus = exitstatus
        self.log_tail = tuple(log_tail)


class ProxmoxTaskTimeout(TaskTimeout):
    """Waiting on a PVE task ran out of time; the task may still be running."""

    def __init__(self, message: str, *, upid: str, timeout: float) -> None:
        super().__init__(message)
        self.upid = upid
        self.timeout = timeout


_LOCK_RE = re.compile(r"\b(?:CT|VM) is locked \(([^)\s]+)\)")


def lock_name(text: str) -> str | None:
    """The lock named in PVE's ``CT is locked (backup)`` / ``VM is locked (...)``."""
    match = _LOCK_RE.search(text or "")
    return match.group(1) if match else None


# ====================================================================== TLS + connect


class FingerprintAdapter(HTTPAdapter):
    """Accept exactly the certificate with this SHA-256 fingerprint (pinning)."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = normalise_fingerprint(fingerprint)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["assert_fingerprint"] = self.fingerprint
        super().init_poolmanager(*args, **kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        # The CA chain is not consulted: the pinned fingerprint is the trust anchor
        # (urllib3 checks it on every connection and fails closed on a mismatch).
        kwargs["verify"] = False
        return super().send(request, *args, **kwargs)


def normalise_fingerprint(fp: str) -> str:
    hexdigits = fp.replace(":", "").strip().lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ConfigError(f"proxmox.tls.fingerprint: not a SHA-256 fingerprint: {fp!r}")
    return hexdigits


def split_token_id(token_id: str) -> tuple[str, str]:
    """``user@realm!name`` → (``user@realm``, ``name``)."""
    user, sep, name = token_id.partition("!")
    if not sep or "@" not in user or not name:
        raise ConfigError(f"proxmox.token_id: expected USER@REALM!TOKENNAME, got {token_id!r}")
    return user, name


def _tls_verify(tls: Any) -> tuple[bool | str, str | None]:
    """(requests' ``verify`` value, pinned fingerprint or None) — refuses no verification."""
    fingerprint = getattr(tls, "fingerprint", None)
    ca_file = getattr(tls, "ca_file", None)
    verify_flag = getattr(tls, "verify", True)
    if fingerprint:
        return False, fingerprint  # replaced by the pinning adapter
    if not verify_flag:
        raise ConfigError("proxmox.tls: verify is false and no fingerprint is pinned; "
                          "refusing an unverified connection")
    return (str(ca_file) if ca_file else True), None


def connect_lab(spec: ProxmoxSpec | None) -> Any:
    """:func:`connect` to the inventory's ``proxmox`` section, which must be there."""
    if spec is None:
        raise ConfigError("the inventory has no proxmox section")
    return connect(spec)


def connect(spec: ProxmoxSpec) -> Any:
    """A ``ProxmoxAPI`` for the inventory's Proxmox, TLS verified, token auth."""
    from proxmoxer import ProxmoxAPI

    user, token_name = split_token_id(spec.token_id)
    secret = resolve(spec.token_secret).get_secret_value()
    verify, fingerprint = _tls_verify(spec.tls)
    api = ProxmoxAPI(spec.host, port=spec.port, user=user, token_name=token_name,
                     token_value=secret, verify_ssl=verify, timeout=spec.timeout,
                     service="PVE")
    if fingerprint:
        pin_session(api._store["session"], api._store["base_url"], fingerprint)
    return api


class RefusingAdapter(HTTPAdapter):
    """Refuses every request: mounted under the pinning adapter so a URL that does
    not resolve to the pin never falls through to an unverified connection."""

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> Any:
        raise ServiceError(f"proxmox: refusing {request.url}: not under the pinned base URL",
                           service="proxmox", transient=False)


def pin_session(session: requests.Session, base_url: str, fingerprint: str) -> None:
    """Route ``base_url`` (exactly as proxmoxer builds it: IPv6 hosts bracketed)
    through the pinning adapter and every other URL to a refusal; then check that
    the session resolves an API URL to the pin, failing closed (ConfigError)."""
    pin = FingerprintAdapter(fingerprint)
    session.mount("https://", RefusingAdapter())
    session.mount("http://", RefusingAdapter())
    session.mount(base_url.rstrip("/") + "/", pin)
    probe = base_url.rstrip("/") + "/version"
    if session.get_adapter(probe) is not pin:
        raise ConfigError(f"proxmox.tls: the pinned fingerprint would not apply to {probe}; "
                          "refusing an unpinned connection")


def connect_password(spec: ProxmoxSpec, user: str, password_ref: str) -> Any:
    """A ``ProxmoxAPI`` logged in with a ticket (``POST /access/ticket``) as ``user``.

    For tools and rehearsals; flows use API tokens (:func:`connect`). proxmoxer
    fetches the ticket outside the session, so a pinned fingerprint cannot protect
    that request: ticket logins need the system CAs or a CA file.
    """
    from proxmoxer import ProxmoxAPI
    from proxmoxer.core import AuthenticationError

    verify, fingerprint = _tls_verify(spec.tls)
    if fingerprint:
        raise ConfigError("proxmox: ticket login needs tls.ca_file or the system CAs "
                          "(a pinned fingerprint cannot protect the ticket request)")
    password = resolve(password_ref).get_secret_value()
    try:
        return call(ProxmoxAPI, spec.host, port=spec.port, user=user, password=password,
                    verify_ssl=verify, timeout=spec.timeout, service="PVE",
                    what="POST /access/ticket")
    except AuthenticationError:
        raise ServiceError(f"proxmox POST /access/ticket: HTTP 401 authentication failure "
                           f"for {user}", service="proxmox", status=401,
                           transient=False) from None


def call(fn: Any, *args: Any, what: str = "", **kwargs: Any) -> Any:
    """Run one proxmoxer call and type its failure."""
    from proxmoxer.core import ResourceException

    try:
        return fn(*args, **kwargs)
    except ResourceException as exc:
        status = int(exc.status_code)
        reason = str(exc.content or "")
        detail = redact(f"{exc.status_message}: {reason}".strip(": "))
        if exc.errors:
            detail += " " + redact(str(exc.errors))
        message = f"proxmox {what}: HTTP {status} {detail}"
        lock = lock_name(reason) or lock_name(str(exc.errors or ""))
        if lock is not None:
            raise GuestLocked(message, lock=lock, status=status) from None
        raise ServiceError(message, service="proxmox", status=status,
                           transient=status >= 500 and status != 501) from None
    except requests.exceptions.SSLError as exc:
        raise ServiceError(f"proxmox {what}: TLS verification failed ({exc.__class__.__name__})",
                           service="proxmox", transient=False) from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
            requests.exceptions.ChunkedEncodingError) as exc:
        raise ServiceError(f"proxmox {what}: {exc.__class__.__name__}: {redact(str(exc))}",
                           service="proxmox", transient=True) from None


# ====================================================================== requests (pure)


@dataclass(frozen=True)
class ApiRequest:
    """One API call: method, path template, path values, parameters (form/query)."""

    method: Method
    template: str
    path_params: tuple[tuple[str, str], ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> str:
        """The URL path below ``/api2/json`` with every value percent-encoded."""
        values = dict(self.path_params)

        def repl(match: re.Match[str]) -> str:
            return quote(values[match.group(1)], safe="")

        return re.sub(r"\{([\w-]+)\}", repl, self.template)

    @property
    def display(self) -> str:
        """The path with values unencoded (for messages; never holds a secret)."""
        values = dict(self.path_params)
        return re.sub(r"\{([\w-]+)\}", lambda m: values[m.group(1)], self.template)


def _form_value(value: Any) -> Any:
    if isinstance(value, bool):
        return 1 if value else 0
    return value


def api_request(method: Method, template: str, params: Mapping[str, Any] | None = None,
                **path: Any) -> ApiRequest:
    """Build a request; ``None`` parameters are dropped, booleans become 1/0."""
    names = re.findall(r"\{([\w-]+)\}", template)
    if set(names) != set(path):
        raise ValueError(f"{template}: path values {sorted(path)} != {sorted(names)}")
    clean = {k: _form_value(v) for k, v in (params or {}).items() if v is not None}
    return ApiRequest(method, template, tuple((n, str(path[n])) for n in names), clean)


def _gtype(gtype: str) -> str:
    if gtype not in ("lxc", "qemu"):
        raise ValueError(f"guest type must be lxc or qemu, not {gtype!r}")
    return gtype


def join_ids(values: Iterable[int | str]) -> str:
    return ",".join(str(int(v)) for v in values)


def format_retention(keep: Mapping[str, int] | str | None) -> str | None:
    """``{"keep-last": 3, "keep-daily": 7}`` → ``keep-daily=7,keep-last=3`` (PVE's format)."""
    if keep is None or isinstance(keep, str):
        return keep
    allowed = ("keep-all", "keep-last", "keep-hourly", "keep-daily", "keep-weekly",
               "keep-monthly", "keep-yearly")
    parts = []
    for key in allowed:
        if key in keep and keep[key] is not None:
            value = int(keep[key])
            if value < 0:
                raise ValueError(f"{key} must be >= 0")
            parts.append(f"{key}={value}")
    unknown = set(keep) - set(allowed)
    if unknown:
        raise ValueError(f"unknown retention keys: {sorted(unknown)}")
    return ",".join(parts) or None


def format_tags(tags: Iterable[str] | str | None) -> str | None:
    if tags is None or isinstance(tags, str):
        return tags
    return ";".join(tags)


# --- cluster / guests (read)

def version_request() -> ApiRequest:
    return api_request("GET", "/version")


def nodes_request() -> ApiRequest:
    return api_request("GET", "/nodes")


def resources_request(rtype: Literal["vm", "storage", "node"] | None = "vm") -> ApiRequest:
    return api_request("GET", "/cluster/resources", {"type": rtype})


def nextid_request(vmid: int | None = None) -> ApiRequest:
    return api_request("GET", "/cluster/nextid", {"vmid": vmid})


def guest_config_request(node: str, vmid: int, gtype: GuestType, *,
                         snapshot: str | None = None) -> ApiRequest:
    return api_request("GET", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/config",
                       {"snapshot": snapshot}, node=node, vmid=vmid)


def guest_status_request(node: str, vmid: int, gtype: GuestType) -> ApiRequest:
    return api_request("GET", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/status/current",
                       node=node, vmid=vmid)


# --- create / clone / restore / configure / power / destroy

def create_lxc_request(node: str, vmid: int, ostemplate: str, *, hostname: str | None = None,
                       storage: str | None = None, rootfs: str | None = None,
                       memory: int | None = None, swap: int | None = None,
                       cores: int | None = None, net: Mapping[int, str] | None = None,
                       unprivileged: bool | None = None, features: str | None = None,
                       pool: str | None = None, tags: Iterable[str] | str | None = None,
                       onboot: bool | None = None, start: bool | None = None,
                       ssh_public_keys: str | None = None,
                       options: Mapping[str, Any] | None = None) -> ApiRequest:
    """``POST /nodes/{node}/lxc`` from a container template (``ostemplate`` volid)."""
    params: dict[str, Any] = {
        "vmid": vmid, "ostemplate": ostemplate, "hostname": hostname, "storage": storage,
        "rootfs": rootfs, "memory": memory, "swap": swap, "cores": cores,
        "unprivileged": unprivileged, "features": features, "pool": pool,
        "tags": format_tags(tags), "onboot": onboot, "start": start,
        "ssh-public-keys": ssh_public_keys,
    }
    for index, value in (net or {}).items():
        params[f"net{int(index)}"] = value
    params.update(options or {})
    return api_request("POST", "/nodes/{node}/lxc", params, node=node)


def restore_lxc_request(node: str, vmid: int, archive: str, *, storage: str | None = None,
                        force: bool | None = None, pool: str | None = None,
                        unique: bool | None = None, start: bool | None = None,
                        options: Mapping[str, Any] | None = None) -> ApiRequest:
    """``POST /nodes/{node}/lxc`` with ``restore=1`` and ``ostemplate`` = the backup volid."""
    params: dict[str, Any] = {"vmid": vmid, "ostemplate": archive, "restore": True,
                              "storage": storage, "force": force, "pool": pool,
                              "unique": unique, "start": start, **(options or {})}
    return api_request("POST", "/nodes/{node}/lxc", params, node=node)


def restore_qemu_request(node: str, vmid: int, archive: str, *, storage: str | None = None,
                         force: bool | None = None, pool: str | None = None,
                         unique: bool | None = None, start: bool | None = None,
                         options: Mapping[str, Any] | None = None) -> ApiRequest:
    """``POST /nodes/{node}/qemu`` with ``archive`` = the backup volid (PVE >= 7.2 applies
    extra ``options`` over the archived config)."""
    params = {"vmid": vmid, "archive": archive, "storage": storage, "force": force,
              "pool": pool, "unique": unique, "start": start, **(options or {})}
    return api_request("POST", "/nodes/{node}/qemu", params, node=node)


# --- a restored copy must not reach production (pure)

_PASSTHROUGH_KEY = re.compile(r"(hostpci|dev|parallel)\d+")
"""QEMU PCI passthrough, LXC device passthrough, host parallel ports: always the host's."""
_HOST_PATH_KEY = re.compile(r"(mp|scsi|sata|ide|virtio|serial)\d+")
"""Keys whose value may name a host path: LXC bind/device mount points, QEMU disks passed
through by path (``/dev/disk/by-id/...``), serial ports on a host device."""
_USB_KEY = re.compile(r"usb\d+")
_NIC_KEY = re.compile(r"net\d+")


def _first_value(value: Any) -> str:
    first = str(value).split(",", 1)[0]
    for prefix in ("volume=", "file=", "host=", "path="):
        if first.startswith(prefix):
            return first[len(prefix):]
    return first


def host_bound_keys(config: Mapping[str, Any]) -> list[str]:
    """Config keys of a guest *copy* that would reach the host's own files or hardware
    shared with the original: LXC bind and device mount points (``mpN`` with a host
    path), device passthrough (``devN``, ``hostpciN``, host ``usbN``), disks, serial and
    parallel ports given by host path. Deleted from restored copies and drill guests."""
    out: list[str] = []
    for key, value in sorted(config.items()):
        first = _first_value(value)
        if _PASSTHROUGH_KEY.fullmatch(key):
            out.append(key)
        elif _USB_KEY.fullmatch(key) and first != "spice":
            out.append(key)
        elif _HOST_PATH_KEY.fullmatch(key) and first.startswith("/"):
            out.append(key)
    return out


def unplugged_nics(config: Mapping[str, Any]) -> dict[str, str]:
    """Every NIC of a guest copy with ``link_down=1``: its settings (MAC, bridge, address)
    kept for a person to review, its cable pulled, so an address, cron jobs or mailers
    of the original never run twice on production's network."""
    out: dict[str, str] = {}
    for key, value in sorted(config.items()):
        if _NIC_KEY.fullmatch(key):
            parts = [p for p in str(value).split(",") if p and not p.startswith("link_down=")]
            out[key] = ",".join([*parts, "link_down=1"])
    return out


def clone_qemu_request(node: str, vmid: int, newid: int, *, name: str | None = None,
                       full: bool | None = None, target: str | None = None,
                       storage: str | None = None, pool: str | None = None,
                       snapname: str | None = None, disk_format: str | None = None) -> ApiRequest:
    """``POST /nodes/{node}/qemu/{vmid}/clone``: full or linked (from a template)."""
    if storage is not None and full is False:
        raise ValueError("a target storage needs a full clone (PVE refuses it for linked)")
    params = {"newid": newid, "name": name, "full": full, "target": target,
              "storage": storage, "pool": pool, "snapname": snapname, "format": disk_format}
    return api_request("POST", "/nodes/{node}/qemu/{vmid}/clone", params, node=node, vmid=vmid)


def configure_request(node: str, vmid: int, gtype: GuestType, options: Mapping[str, Any], *,
                      delete: Iterable[str] = (), digest: str | None = None,
                      asynchronous: bool = False) -> ApiRequest:
    """Change a guest's config: ``PUT .../config``; QEMU ``asynchronous`` uses POST (a task)."""
    deletes = list(delete)
    clash = set(deletes) & set(options)
    if clash:
        raise ValueError(f"cannot set and delete {sorted(clash)} at the same time")
    if asynchronous and gtype != "qemu":
        raise ValueError("only QEMU has an asynchronous config update (POST)")
    params: dict[str, Any] = {**options, "delete": ",".join(deletes) or None, "digest": digest}
    if "tags" in params:
        params["tags"] = format_tags(params["tags"])
    method: Method = "POST" if asynchronous else "PUT"
    return api_request(method, f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/config", params,
                       node=node, vmid=vmid)


def stop_task_request(upid: Upid) -> ApiRequest:
    """Stop a running task: ``DELETE /nodes/{node}/tasks/{upid}``."""
    return api_request("DELETE", "/nodes/{node}/tasks/{upid}", node=upid.node, upid=upid.raw)


def resize_request(node: str, vmid: int, gtype: GuestType, disk: str, size: str
                   ) -> ApiRequest:
    """Grow a disk: ``PUT .../resize`` with an absolute size (``16G``) or ``+4G``."""
    return api_request("PUT", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/resize",
                       {"disk": disk, "size": size}, node=node, vmid=vmid)


def power_request(node: str, vmid: int, gtype: GuestType,
                  action: Literal["start", "stop", "shutdown"], *,
                  timeout: int | None = None, force_stop: bool | None = None) -> ApiRequest:
    """``POST .../status/{start,stop,shutdown}``; ``timeout``/``force_stop`` for shutdown."""
    if action not in ("start", "stop", "shutdown"):
        raise ValueError(f"unknown power action {action!r}")
    params: dict[str, Any] = {}
    if action == "shutdown":
        params = {"timeout": timeout, "forceStop": force_stop}
    elif timeout is not None or force_stop is not None:
        raise ValueError("timeout/force_stop apply to shutdown only")
    return api_request("POST", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/status/{action}",
                       params, node=node, vmid=vmid)


def destroy_request(node: str, vmid: int, gtype: GuestType, *, purge: bool = True,
                    destroy_unreferenced_disks: bool = True) -> ApiRequest:
    """``DELETE /nodes/{node}/{type}/{vmid}`` (purge: also from backup jobs, HA, replication)."""
    params = {"purge": purge, "destroy-unreferenced-disks": destroy_unreferenced_disks}
    return api_request("DELETE", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}", params,
                       node=node, vmid=vmid)


# --- snapshots

def snapshot_list_request(node: str, vmid: int, gtype: GuestType) -> ApiRequest:
    return api_request("GET", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot",
                       node=node, vmid=vmid)


def snapshot_create_request(node: str, vmid: int, gtype: GuestType, name: str, *,
                            vmstate: bool | None = None) -> ApiRequest:
    """``POST .../snapshot``. (PVE also takes ``description``; the structure file this
    project validates against lost every parameter named ``description``, so the
    adapter does not send it.)"""
    if vmstate is not None and gtype != "qemu":
        raise ValueError("vmstate applies to QEMU snapshots only")
    params = {"snapname": name, "vmstate": vmstate}
    return api_request("POST", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot", params,
                       node=node, vmid=vmid)


def snapshot_rollback_request(node: str, vmid: int, gtype: GuestType, name: str, *,
                              start: bool | None = None) -> ApiRequest:
    return api_request("POST",
                       f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot/{{snapname}}/rollback",
                       {"start": start}, node=node, vmid=vmid, snapname=name)


def snapshot_delete_request(node: str, vmid: int, gtype: GuestType, name: str, *,
                            force: bool | None = None) -> ApiRequest:
    return api_request("DELETE", f"/nodes/{{node}}/{_gtype(gtype)}/{{vmid}}/snapshot/{{snapname}}",
                       {"force": force}, node=node, vmid=vmid, snapname=name)


# --- backups, storage, prune

def vzdump_request(node: str, *, vmids: Sequence[int] = (), all_guests: bool = False,
                   pool: str | None = None, exclude: Sequence[int] = (),
                   mode: Literal["snapshot", "suspend", "stop"] = "snapshot",
                   compress: Literal["0", "gzip", "lzo", "zstd"] | None = "zstd",
                   storage: str | None = None, notes_template: str | None = None,
                   prune_backups: Mapping[str, int] | str | None = None,
                   protected: bool | None = None, remove: bool | None = None,
                   lockwait: int | None = None) -> ApiRequest:
    """``POST /nodes/{node}/vzdump`` for guests (``vmids``), a pool, or all on the node."""
    chosen = sum(bool(x) for x in (vmids, all_guests, pool))
    if chosen != 1:
        raise ValueError("select exactly one of vmids, all_guests, pool")
    if exclude and not (all_guests or pool):
        raise ValueError("exclude applies to all_guests or pool")
    params = {
        "vmid": join_ids(vmids) if vmids else None, "all": True if all_guests else None,
        "pool": pool, "exclude": join_ids(exclude) if exclude else None, "mode": mode,
        "compress": compress, "storage": storage, "notes-template": notes_template,
        "prune-backups": format_retention(prune_backups), "protected": protected,
        "remove": remove, "lockwait": lockwait,
    }
    return api_request("POST", "/nodes/{node}/vzdump", params, node=node)


def storage_content_request(node: str, storage: str, *, content: str | None = None,
                            vmid: int | None = None) -> ApiRequest:
    return api_request("GET", "/nodes/{node}/storage/{storage}/content",
                       {"content": content, "vmid": vmid}, node=node, storage=storage)


def storage_of(volid: str) -> str:
    storage, sep, _ = volid.partition(":")
    if not sep or not storage:
        raise ValueError(f"not a volume ID: {volid!r}")
    return storage


def delete_volume_request(node: str, volid: str, *, delay: int | None = None) -> ApiRequest:
    """``DELETE /nodes/{node}/storage/{storage}/content/{volume}`` (volid encoded)."""
    return api_request("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}",
                       {"delay": delay}, node=node, storage=storage_of(volid), volume=volid)


def volume_attributes_request(node: str, volid: str, *, protected: bool | None = None,
                              notes: str | None = None) -> ApiRequest:
    """``PUT /nodes/{node}/storage/{storage}/content/{volume}`` (``updateattributes``):
    mark a backup protected (no prune or retention removes it) or change its notes."""
    return api_request("PUT", "/nodes/{node}/storage/{storage}/content/{volume}",
                       {"protected": protected, "notes": notes}, node=node,
                       storage=storage_of(volid), volume=volid)


def prune_dry_run_request(node: str, storage: str, *,
                          prune_backups: Mapping[str, int] | str | None = None,
                          vmid: int | None = None,
                          gtype: GuestType | None = None) -> ApiRequest:
    params = {"prune-backups": format_retention(prune_backups), "vmid": vmid, "type": gtype}
    return api_request("GET", "/nodes/{node}/storage/{storage}/prunebackups", params,
                       node=node, storage=storage)


def prune_request(node: str, storage: str, *, vmid: int,
                  prune_backups: Mapping[str, int] | str | None = None,
                  gtype: GuestType | None = None) -> ApiRequest:
    """``DELETE .../prunebackups`` for one guest (a storage-wide prune would need the
    broader ``Datastore.Allocate``; per guest, ``VM.Backup`` + ``AllocateSpace`` suffice)."""
    params = {"prune-backups": format_retention(prune_backups), "vmid": vmid, "type": gtype}
    return api_request("DELETE", "/nodes/{node}/storage/{storage}/prunebackups", params,
                       node=node, storage=storage)


# --- backup jobs

def backup_jobs_request() -> ApiRequest:
    return api_request("GET", "/cluster/backup")


def backup_job_get_request(job_id: str) -> ApiRequest:
    return api_request("GET", "/cluster/backup/{id}", id=job_id)


def _job_params(schedule: str | None, vmids: Sequence[int], all_guests: bool | None,
                pool: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {"schedule": schedule,
                              "vmid": join_ids(vmids) if vmids else None,
                              "all": all_guests, "pool": pool}
    for key, value in fields.items():
        name = key.replace("_", "-")
        if name == "prune-backups":
            value = format_retention(value)
        params[name] = value
    return params


def backup_job_create_request(job_id: str, *, schedule: str, vmids: Sequence[int] = (),
                              all_guests: bool | None = None, pool: str | None = None,
                              **fields: Any) -> ApiRequest:
    """``POST /cluster/backup``; ``fields`` use PVE's names with ``_`` for ``-``
    (storage, mode, compress, notes_template, prune_backups, enabled, comment, node ...)."""
    if sum(bool(x) for x in (vmids, all_guests, pool)) != 1:
        raise ValueError("select exactly one of vmids, all_guests, pool")
    params = {"id": job_id, **_job_params(schedule, vmids, all_guests, pool, fields)}
    return api_request("POST", "/cluster/backup", params)


def backup_job_update_request(job_id: str, *, schedule: str | None = None,
                              vmids: Sequence[int] = (), all_guests: bool | None = None,
                              pool: str | None = None, delete: Iterable[str] = (),
                              **fields: Any) -> ApiRequest:
    params = _job_params(schedule, vmids, all_guests, pool, fields)
    params["delete"] = ",".join(delete) or None
    return api_request("PUT", "/cluster/backup/{id}", params, id=job_id)


def backup_job_delete_request(job_id: str) -> ApiRequest:
    return api_request("DELETE", "/cluster/backup/{id}", id=job_id)


# --- tasks

def tasks_request(node: str, *, vmid: int | None = None, typefilter: str | None = None,
                  source: Literal["archive", "active", "all"] | None = None,
                  errors: bool | None = None, since: int | None = None,
                  start: int | None = None, limit: int | None = None) -> ApiRequest:
    params = {"vmid": vmid, "typefilter": typefilter, "source": source, "errors": errors,
              "since": since, "start": start, "limit": limit}
    return api_request("GET", "/nodes/{node}/tasks", params, node=node)


def task_status_request(upid: Upid) -> ApiRequest:
    return api_request("GET", "/nodes/{node}/tasks/{upid}/status", node=upid.node,
                       upid=upid.raw)


def task_log_request(upid: Upid, *, start: int = 0, limit: int = 500) -> ApiRequest:
    return api_request("GET", "/nodes/{node}/tasks/{upid}/log", {"start": start, "limit": limit},
                       node=upid.node, upid=upid.raw)


# Every (method, template) the adapter calls. Tests check each against the structure
# file and derive REQUIRED_PRIVILEGES from it.
ADAPTER_CALLS: tuple[tuple[str, str], ...] = (
    ("GET", "/version"),
    ("GET", "/nodes"),
    ("GET", "/cluster/resources"),
    ("GET", "/cluster/nextid"),
    *((m, t.format(g=g)) for g in ("lxc", "qemu") for m, t in (
        ("GET", "/nodes/{{node}}/{g}/{{vmid}}/config"),
        ("PUT", "/nodes/{{node}}/{g}/{{vmid}}/config"),
        ("PUT", "/nodes/{{node}}/{g}/{{vmid}}/resize"),
        ("GET", "/nodes/{{node}}/{g}/{{vmid}}/status/current"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/status/start"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/status/stop"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/status/shutdown"),
        ("DELETE", "/nodes/{{node}}/{g}/{{vmid}}"),
        ("GET", "/nodes/{{node}}/{g}/{{vmid}}/snapshot"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/snapshot"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/snapshot/{{snapname}}/rollback"),
        ("DELETE", "/nodes/{{node}}/{g}/{{vmid}}/snapshot/{{snapname}}"),
    )),
    ("POST", "/nodes/{node}/lxc"),
    ("POST", "/nodes/{node}/qemu"),
    ("POST", "/nodes/{node}/qemu/{vmid}/clone"),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"),
    ("POST", "/nodes/{node}/vzdump"),
    ("GET", "/nodes/{node}/storage/{storage}/content"),
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("PUT", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("GET", "/nodes/{node}/storage/{storage}/prunebackups"),
    ("DELETE", "/nodes/{node}/storage/{storage}/prunebackups"),
    ("GET", "/cluster/backup"),
    ("POST", "/cluster/backup"),
    ("GET", "/cluster/backup/{id}"),
    ("PUT", "/cluster/backup/{id}"),
    ("DELETE", "/cluster/backup/{id}"),
    ("GET", "/nodes/{node}/tasks"),
    ("GET", "/nodes/{node}/tasks/{upid}/status"),
    ("DELETE", "/nodes/{node}/tasks/{upid}"),
    ("GET", "/nodes/{node}/tasks/{upid}/log"),
)


# ====================================================================== least privilege

# Endpoints whose structure entry says only ``user: all`` check inside the handler
# (PVE's API documentation states these checks in prose; the structure file drops
# prose). The privileges labkeeper's use of each needs:
HANDLER_PRIVILEGES: Mapping[tuple[str, str], frozenset[str]] = {
    # "VM.Allocate on /vms/{vmid} or the pool; Datastore.AllocateSpace on the storage"
    ("POST", "/nodes/{node}/lxc"): frozenset({"VM.Allocate", "Datastore.AllocateSpace"}),
    ("POST", "/nodes/{node}/qemu"): frozenset({"VM.Allocate", "Datastore.AllocateSpace"}),
    # "VM.Backup on the guests and Datastore.AllocateSpace on the backup storage"
    ("POST", "/nodes/{node}/vzdump"): frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # backup volumes: "Datastore.AllocateSpace if you have VM.Backup on the VM"
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"):
        frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # updateattributes (protected, notes) checks like the deletion of a backup
    ("PUT", "/nodes/{node}/storage/{storage}/content/{volume}"):
        frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # with a vmid: "Datastore.AllocateSpace and VM.Backup for the VM"
    ("DELETE", "/nodes/{node}/storage/{storage}/prunebackups"):
        frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # guests are listed only where the token has VM.Audit
    ("GET", "/cluster/resources"): frozenset({"VM.Audit"}),
    # other users' tasks (scheduled vzdump jobs run as root@pam) need Sys.Audit
    ("GET", "/nodes/{node}/tasks"): frozenset({"Sys.Audit"}),
}


def _check_privileges(expr: Sequence[Any]) -> set[str]:
    """Privileges that satisfy one ``permissions.check`` expression.

    ``perm`` with ``any``: every listed privilege (PVE then checks the specific one
    per changed option inside the handler, e.g. VM.Config.Memory for ``memory``);
    ``and``: all branches; ``or``: the first branch that needs no optional
    parameter (``require_param``), i.e. the path labkeeper takes.
    """
    kind = expr[0]
    if kind == "perm":
        opts = dict(zip(expr[3::2], expr[4::2], strict=False))
        if "require_param" in opts:
            raise LookupError("needs an optional parameter")
        return set(expr[2])
    if kind == "and":
        return set().union(*(_check_privileges(sub) for sub in expr[1:]))
    if kind == "or":
        for sub in expr[1:]:
            try:
                return _check_privileges(sub)
            except LookupError:
                continue
        raise LookupError("no branch without optional parameters")
    raise ValueError(f"unsupported permission check {kind!r}")


def derive_privileges(structure: Mapping[str, Any],
                      calls: Iterable[tuple[str, str]] = ADAPTER_CALLS) -> frozenset[str]:
    """The union of privileges that ``calls`` need, from the structure file's
    ``permissions`` plus :data:`HANDLER_PRIVILEGES` for ``user: all`` endpoints."""
    out: set[str] = set()
    for method, template in calls:
        endpoint = structure["paths"][template][method]
        perms = endpoint.get("permissions") or {}
        if perms.get("check"):
            out |= _check_privileges(perms["check"])
        out |= HANDLER_PRIVILEGES.get((method, template), frozenset())
    return frozenset(out)


REQUIRED_PRIVILEGES: tuple[str, ...] = (
    "Datastore.AllocateSpace",
    "Datastore.Audit",
    "Sys.Audit",
    "Sys.Modify",
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
    "VM.Snapshot",
    "VM.Snapshot.Rollback",
)
"""The least-privilege role of a labkeeper API token (``pveum role add Labkeeper
-privs ...``), equal to ``derive_privileges(structure)`` (tested)."""


# ====================================================================== responses


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _split_tags(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, str):
        return [t for t in re.split(r"[;,\s]+", value) if t]
    return value


Tags = Annotated[list[str], BeforeValidator(_split_tags)]


class Guest(_Tolerant):
    """A guest as ``/cluster/resources`` lists it."""

    vmid: int
    type: GuestType
    node: str
    name: str = ""
    status: str = "unknown"
    tags: Tags = []
    pool: str | None = None
    template: bool = False
    lock: str | None = None
    maxmem: int = 0
    maxdisk: int = 0
    uptime: int = 0


class GuestStatus(_Tolerant):
    status: str
    vmid: int | None = None
    name: str = ""
    lock: str | None = None
    uptime: int = 0
    qmpstatus: str | None = None
    tags: Tags = []


class GuestConfig(_Tolerant):
    """A guest's configuration; ``values`` holds every key as PVE returned it."""

    digest: str = ""
    lock: str | None = None
    parent: str | None = None
    hostname: str | None = None
    name: str | None = None
    template: bool = False
    tags: Tags = []
    values: dict[str, Any] = {}

    @classmethod
    def from_api(cls, data: Mapping[str, Any]) -> GuestConfig:
        return cls.model_validate({**data, "values": dict(data)})


class Snapshot(_Tolerant):
    name: str
    snaptime: int | None = None
    description: str = ""
    parent: str | None = None
    vmstate: bool = False


class StorageVolume(_Tolerant):
    volid: str
    content: str
    format: str = ""
    size: int = 0
    ctime: int | None = None
    vmid: int | None = None
    notes: str = ""
    protected: bool = False
    subtype: str | None = None
    parent: str | None = None


class PruneMark(_Tolerant):
    volid: str
    mark: Literal["keep", "remove", "protected", "renamed"]
    ctime: int | None = None
    type: str | None = None
    vmid: int | None = None


class BackupJob(_Tolerant):
    id: str
    type: str = "vzdump"
    schedule: str | None = None
    enabled: bool = True
    storage: str | None = None
    vmid: str | None = None
    all: bool = False
    pool: str | None = None
    node: str | None = None
    mode: str | None = None
    compress: str | None = None
    comment: str | None = None
    notes_template: str | None = Field(default=None, alias="notes-template")
    prune_backups: str | dict[str, Any] | None = Field(default=None, alias="prune-backups")
    next_run: int | None = Field(default=None, alias="next-run")

    @property
    def vmids(self) -> list[int]:
        return [int(v) for v in re.split(r"[,;\s]+", self.vmid or "") if v]


class TaskSummary(_Tolerant):
    """A task as ``GET /nodes/{node}/tasks`` lists it (``status`` = exit status)."""

    upid: str
    node: str
    type: str
    id: str = ""
    user: str = ""
    starttime: int = 0
    endtime: int | None = None
    status: str | None = None


class TaskStatus(_Tolerant):
    status: Literal["running", "stopped"]
    exitstatus: str | None = None
    starttime: int | None = None
    type: str | None = None
    id: str | None = None


class VersionInfo(_Tolerant):
    version: str
    release: str = ""
    repoid: str = ""


# ====================================================================== UPIDs


@dataclass(frozen=True)
class Upid:
    """PVE's task id ``UPID:node:pid:pstart:starttime:type:id:user:`` (hex numbers)."""

    raw: str
    node: str
    pid: int
    pstart: int
    starttime: int
    type: str
    id: str
    user: str

    def __str__(self) -> str:
        return self.raw


def parse_upid(text: str) -> Upid:
    """Parse a UPID; the id may itself contain ``:`` (the user never does)."""
    text = str(text).strip()
    parts = text.split(":")
    if len(parts) < 9 or parts[0] != "UPID" or parts[-1] != "":
        raise ValueError(f"not a PVE UPID: {text!r}")
    node, pid, pstart, starttime, ttype = parts[1:6]
    user = parts[-2]
    task_id = ":".join(parts[6:-2])
    if not node or not ttype or "@" not in user:
        raise ValueError(f"not a PVE UPID: {text!r}")
    try:
        return Upid(text, node, int(pid, 16), int(pstart, 16), int(starttime, 16), ttype,
                    task_id, user)
    except ValueError:
        raise ValueError(f"not a PVE UPID: {text!r}") from None


def _as_upid(data: Any, what: str) -> Upid:
    try:
        return parse_upid(str(data))
    except ValueError:
        raise ServiceError(f"proxmox {what}: expected a task id (UPID), got {data!r}",
                           service="proxmox", transient=False) from None


# ====================================================================== the thin layer


def send(api: Any, req: ApiRequest) -> Any:
    """Send one request through proxmoxer; failures typed by :func:`call`."""
    resource = api(req.path.lstrip("/")) if req.path != "/" else api
    fn = getattr(resource, req.method.lower())
    return call(fn, what=f"{req.method} {req.display}", **dict(req.params))


P = ParamSpec("P")
M = TypeVar("M", bound=BaseModel)


def _task_op(builder: Callable[P, ApiRequest]) -> Callable[Concatenate[Any, P], Upid]:
    @functools.wraps(builder)
    def op(api: Any, *args: P.args, **kwargs: P.kwargs) -> Upid:
        req = builder(*args, **kwargs)
        return _as_upid(send(api, req), f"{req.method} {req.display}")

    op.__doc__ = f"Run {builder.__name__} and return the task's UPID.\n\n{builder.__doc__ or ''}"
    op.__name__ = builder.__name__.removesuffix("_request")
    return op


def _list_op(builder: Callable[P, ApiRequest],
             model: type[M]) -> Callable[Concatenate[Any, P], list[M]]:
    @functools.wraps(builder)
    def op(api: Any, *args: P.args, **kwargs: P.kwargs) -> list[M]:
        return [model.model_validate(item) for item in send(api, builder(*args, **kwargs)) or []]

    op.__name__ = builder.__name__.removesuffix("_request")
    return op


def _none_op(builder: Callable[P, ApiRequest]) -> Callable[Concatenate[Any, P], None]:
    @functools.wraps(builder)
    def op(api: Any, *args: P.args, **kwargs: P.kwargs) -> None:
        send(api, builder(*args, **kwargs))

    op.__name__ = builder.__name__.removesuffix("_request")
    return op


# --- operations: cluster / read

def version(api: Any) -> str:
    data = send(api, version_request())
    return str(data.get("version", "?"))


def version_info(api: Any) -> VersionInfo:
    return VersionInfo.model_validate(send(api, version_request()))


def node_names(api: Any) -> list[str]:
    data = send(api, nodes_request())
    return sorted(str(n["node"]) for n in data)


def filter_guests(guests: Iterable[Guest], *, node: str | None = None, tag: str | None = None,
                  pool: str | None = None, gtype: GuestType | None = None,
                  templates: bool = True) -> list[Guest]:
    """Pure selection of guests by node, tag, pool and type (sorted by vmid)."""
    out = [g for g in guests
           if (node is None or g.node == node) and (tag is None or tag in g.tags)
           and (pool is None or g.pool == pool) and (gtype is None or g.type == gtype)
           and (templates or not g.template)]
    return sorted(out, key=lambda g: g.vmid)


def list_guests(api: Any, *, node: str | None = None, tag: str | None = None,
                pool: str | None = None, gtype: GuestType | None = None,
                templates: bool = True) -> list[Guest]:
    """Guests from ``/cluster/resources`` (one call for the whole cluster), filtered."""
    data = send(api, resources_request("vm")) or []
    guests = [Guest.model_validate(e) for e in data if e.get("type") in ("lxc", "qemu")]
    return filter_guests(guests, node=node, tag=tag, pool=pool, gtype=gtype,
                         templates=templates)


def find_guest(api: Any, vmid: int) -> Guest | None:
    """Where guest ``vmid`` lives (node, type), or None if the cluster has no such guest."""
    for guest in list_guests(api):
        if guest.vmid == int(vmid):
            return guest
    return None


def next_vmid(api: Any, wanted: int | None = None) -> int:
    """The next free VMID (or check that ``wanted`` is free: 400 permanent if not)."""
    return int(send(api, nextid_request(wanted)))


def guest_config(api: Any, node: str, vmid: int, gtype: GuestType, *,
                 snapshot: str | None = None) -> GuestConfig:
    return GuestConfig.from_api(
        send(api, guest_config_request(node, vmid, gtype, snapshot=snapshot)) or {})


def guest_status(api: Any, node: str, vmid: int, gtype: GuestType) -> GuestStatus:
    return GuestStatus.model_validate(send(api, guest_status_request(node, vmid, gtype)))


# --- operations that start tasks

create_lxc = _task_op(create_lxc_request)
restore_lxc = _task_op(restore_lxc_request)
restore_qemu = _task_op(restore_qemu_request)
clone_qemu = _task_op(clone_qemu_request)
power = _task_op(power_request)
destroy_guest = _task_op(destroy_request)
create_snapshot = _task_op(snapshot_create_request)
rollback_snapshot = _task_op(snapshot_rollback_request)
delete_snapshot = _task_op(snapshot_delete_request)
vzdump = _task_op(vzdump_request)
prune_backups = _task_op(prune_request)


def start_guest(api: Any, node: str, vmid: int, gtype: GuestType) -> Upid:
    return power(api, node, vmid, gtype, "start")


def stop_guest(api: Any, node: str, vmid: int, gtype: GuestType) -> Upid:
    return power(api, node, vmid, gtype, "stop")


def shutdown_guest(api: Any, node: str, vmid: int, gtype: GuestType, *,
                   timeout: int | None = None, force_stop: bool | None = None) -> Upid:
    return power(api, node, vmid, gtype, "shutdown", timeout=timeout, force_stop=force_stop)


def configure(api: Any, node: str, vmid: int, gtype: GuestType, options: Mapping[str, Any], *,
              delete: Iterable[str] = (), digest: str | None = None,
              asynchronous: bool = False) -> Upid | None:
    """Update a guest's config. PUT answers when done (None); QEMU POST returns a UPID."""
    req = configure_request(node, vmid, gtype, options, delete=delete, digest=digest,
                            asynchronous=asynchronous)
    data = send(api, req)
    return _as_upid(data, f"{req.method} {req.display}") if asynchronous else None


def stop_task(api: Any, upid: Upid | str) -> None:
    """Stop a running task (it then ends with ``interrupted by signal``)."""
    send(api, stop_task_request(upid if isinstance(upid, Upid) else parse_upid(upid)))


def resize_disk(api: Any, node: str, vmid: int, gtype: GuestType, disk: str,
                size: str) -> Upid:
    """Grow a guest disk (PVE never shrinks); returns the resize task."""
    req = resize_request(node, vmid, gtype, disk, size)
    return _as_upid(send(api, req), f"{req.method} {req.display}")


def delete_volume(api: Any, node: str, volid: str) -> Upid | None:
    """Delete a volume (a backup archive, say); PVE answers with a task id."""
    req = delete_volume_request(node, volid)
    data = send(api, req)
    return _as_upid(data, f"{req.method} {req.display}") if data else None


# --- list operations

list_snapshots_raw = _list_op(snapshot_list_request, Snapshot)


def list_snapshots(api: Any, node: str, vmid: int, gtype: GuestType) -> list[Snapshot]:
    """The guest's snapshots (without PVE's ``current`` pseudo-entry)."""
    return [s for s in list_snapshots_raw(api, node, vmid, gtype) if s.name != "current"]


storage_content = _list_op(storage_content_request, StorageVolume)
prune_dry_run = _list_op(prune_dry_run_request, PruneMark)
list_backup_jobs = _list_op(backup_jobs_request, BackupJob)
list_tasks = _list_op(tasks_request, TaskSummary)
create_backup_job = _none_op(backup_job_create_request)
update_backup_job = _none_op(backup_job_update_request)
set_volume_attributes = _none_op(volume_attributes_request)
delete_backup_job = _none_op(backup_job_delete_request)


def get_backup_job(api: Any, job_id: str) -> BackupJob:
    return BackupJob.model_validate(send(api, backup_job_get_request(job_id)))


def backups(api: Any, node: str, storage: str, *, vmid: int | None = None) -> list[StorageVolume]:
    """Backup archives on a storage (newest first)."""
    vols = storage_content(api, node, storage, content="backup", vmid=vmid)
    return sorted(vols, key=lambda v: (v.ctime or 0, v.volid), reverse=True)


# ====================================================================== tasks


def classify_exitstatus(exitstatus: str | None) -> tuple[bool, int]:
    """(success, warnings): ``OK`` → (True, 0); ``WARNINGS: n`` → (True, n); else failure."""
    text = (exitstatus or "").strip()
    if text == "OK":
        return True, 0
    match = re.fullmatch(r"WARNINGS: (\d+)", text)
    if match:
        return True, int(match.group(1))
    return False, 0


def poll_delays(start: float = 0.2, cap: float = 5.0, factor: float = 1.5) -> Iterator[float]:
    """Backoff between status polls: start, start*factor, ... capped at ``cap``."""
    delay = start
    while True:
        yield min(delay, cap)
        delay = min(delay * factor, cap)


@dataclass(frozen=True)
class TaskResult:
    upid: Upid
    status: str
    exitstatus: str
    ok: bool
    warnings: int
    duration: float
    log: tuple[str, ...]

    def tail(self, lines: int = 20) -> tuple[str, ...]:
        return self.log[-lines:]


def task_status(api: Any, upid: Upid | str) -> TaskStatus:
    upid = upid if isinstance(upid, Upid) else parse_upid(upid)
    return TaskStatus.model_validate(send(api, task_status_request(upid)))


def task_log(api: Any, upid: Upid | str, *, page: int = 500) -> list[str]:
    """Every log line of a task (PVE returns 50 by default: page with start/limit)."""
    upid = upid if isinstance(upid, Upid) else parse_upid(upid)
    lines: list[str] = []
    start = 0
    while True:
        chunk = send(api, task_log_request(upid, start=start, limit=page)) or []
        lines.extend(str(item.get("t", "")) for item in chunk)
        if len(chunk) < page:
            break
        start += len(chunk)
    if lines == ["no content"]:
        return []
    return lines


def _task_failed_transient(exitstatus: str, tail: Sequence[str]) -> bool:
    text = "\n".join([exitstatus, *tail])
    return lock_name(text) is not None or "can't acquire lock" in text


def task_result(upid: Upid, status: TaskStatus, log: Sequence[str],
                duration: float) -> TaskResult:
    """Pure: the result of a stopped task, or raise :class:`ProxmoxTaskError`."""
    exitstatus = status.exitstatus or "unexpected status"
    ok, warnings = classify_exitstatus(exitstatus)
    result = TaskResult(upid, status.status, exitstatus, ok, warnings, duration,
                        tuple(redact(line) for line in log))
    if not ok:
        tail = result.tail(20)
        shown = "; ".join(line for line in tail[-8:] if line.strip())
        raise ProxmoxTaskError(
            redact(f"proxmox task {upid.type} {upid.id} on {upid.node} failed: {exitstatus}"
                   f" (UPID {upid.raw}); log tail: {shown}"),
            upid=upid.raw, exitstatus=redact(exitstatus), log_tail=tail,
            transient=_task_failed_transient(exitstatus, tail))
    return result


def wait_for_task(api: Any, upid: Upid | str, *, timeout: float, poll: float = 0.2,
                  max_poll: float = 5.0,
                  clock: Callable[[], float] = time.monotonic,
                  sleep: Callable[[float], None] = time.sleep) -> TaskResult:
    """Poll a task until it stops; return its result (``OK``/``WARNINGS: n``) or raise.

    Raises :class:`ProxmoxTaskError` (exit status + log tail) when the task failed,
    :class:`ProxmoxTaskTimeout` (a :class:`~labkeeper.errors.TaskTimeout`) when it is
    still running after ``timeout`` seconds. Transient API errors while polling
    (503, a reset connection) are ridden out until the deadline.
    """
    upid = upid if isinstance(upid, Upid) else parse_upid(upid)
    started = clock()
    deadline = started + timeout
    delays = poll_delays(poll, max_poll)
    last_error: ServiceError | None = None
    while True:
        try:
            status = task_status(api, upid)
            last_error = None
        except ServiceError as exc:
            if not exc.transient:
                raise
            status, last_error = None, exc
        if status is not None and status.status == "stopped":
            log = task_log(api, upid)
            return task_result(upid, status, log, clock() - started)
        now = clock()
        if now >= deadline:
            why = f" (last poll: {last_error})" if last_error else ""
            raise ProxmoxTaskTimeout(
                f"proxmox task {upid.type} {upid.id} on {upid.node} still running after "
                f"{timeout:g}s; it may still be running — UPID {upid.raw}{why}",
                upid=upid.raw, timeout=timeout)
        sleep(max(0.0, min(next(delays), deadline - now)))

