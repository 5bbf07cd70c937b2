"""The simulator: HTTPS server, authentication, validation and dispatch."""

from __future__ import annotations

import base64
import collections
import json
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from labkeeper.pvesim import api
from labkeeper.pvesim import state as st
from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.faults import Faults
from labkeeper.pvesim.perms import PermissionDenied, Principal, check_permissions
from labkeeper.pvesim.schema import ApiSchema, validate_params
from labkeeper.pvesim.tasks import TaskManager
from labkeeper.pvesim.tls import generate_cert

API_PREFIX = "/api2/json"
TICKET_LIFETIME = 7200

__all__ = ["ApiError", "Response", "Simulator", "error_response"]


class Response:
    def __init__(
        self,
        status: int,
        body: dict[str, Any],
        reason: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.reason = reason
        self.headers = dict(headers or {})


def error_response(err: ApiError) -> Response:
    body: dict[str, Any] = {"data": None, "message": err.message}
    if err.errors is not None:
        body["errors"] = err.errors
    return Response(err.status, body, reason=err.message)


def parse_form(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, values in parse_qs(text, keep_blank_values=True).items():
        out[key] = values[0] if len(values) == 1 else values
    return out


def parse_token_header(value: str) -> tuple[str, str] | None:
    """``PVEAPIToken=user@realm!id=secret`` (or ``:secret``) -> (tokenid, secret)."""
    if not value.startswith("PVEAPIToken="):
        return None
    rest = value[len("PVEAPIToken=") :]
    bang = rest.find("!")
    if bang < 0:
        return None
    for sep in ("=", ":"):
        idx = rest.find(sep, bang)
        if idx > 0:
            return rest[:idx], rest[idx + 1 :]
    return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], sim: Simulator, ctx: ssl.SSLContext) -> None:
        self.sim = sim
        self.ssl_ctx = ctx
        if ":" in addr[0]:  # an IPv6 literal (``::1``)
            self.address_family = socket.AF_INET6
        super().__init__(addr, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # TLS handshakes refused by clients (wrong CA) and resets are normal here.
        return

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        # Headers and body go out in separate writes: without TCP_NODELAY, Nagle's
        # algorithm meets the client's delayed ACK and every request costs ~40 ms.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self.ssl_ctx.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        ), addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pve-api-daemon/3.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            resp = self.server.sim.handle(
                self.command, self.path, dict(self.headers.items()), body
            )
        except Exception as exc:  # pragma: no cover - last resort, keep serving
            resp = error_response(ApiError(500, f"simulator internal error: {exc!r}"))
        payload = json.dumps(resp.body).encode()
        reason = (resp.reason or "").split("\n")[0].encode("latin-1", "replace").decode("latin-1")
        self.send_response(resp.status, reason or None)
        self.send_header("Content-Type", "application/json;charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "max-age=0")
        for key, value in resp.headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = _serve


class Simulator:
    """A stateful Proxmox VE API on a loopback HTTPS port.

    >>> sim = Simulator(tokens={"labkeeper@pve!ci": "secret"})
    >>> sim.start()   # doctest: +SKIP
    """

    def __init__(
        self,
        nodes: tuple[str, ...] | list[str] = ("pve1", "pve2", "pve3"),
        state_path: Path | str | None = None,
        task_duration: float = 0.2,
        tokens: Mapping[str, str] | None = None,
        users: Mapping[str, str] | None = None,
        token_privileges: Mapping[str, Any] | None = None,
        seed: bool = True,
        data_dir: Path | str | None = None,
        cluster_name: str = "labkeeper-sim",
        host_paths: bool = False,
    ) -> None:
        self.nodes = tuple(nodes)
        self.host_paths = host_paths
        """Report backup archives at their real path under ``data_dir`` (vzdump log,
        ``GET .../content/{volume}``) instead of ``/var/lib/vz/dump/…``."""
        if not self.nodes:
            raise ValueError("at least one node is needed")
        self.state_path = Path(state_path) if state_path else None
        self.task_duration = float(task_duration)
        self.tokens = dict(tokens or {})
        self.users = dict(users or {})
        self.privileges: dict[str, Any] = {}
        for name, privs in (token_privileges or {}).items():
            self.set_privileges(name, privs)
        self.cluster_name = cluster_name
        self.lock = threading.RLock()
        self.faults = Faults()
        self.schema = ApiSchema()
        self.tasks = TaskManager(self)
        self.requests: collections.deque[dict[str, Any]] = collections.deque(maxlen=20000)
        self._tickets: dict[str, tuple[str, str, float]] = {}
        self._vzdump_locks: dict[str, threading.Lock] = {}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._own_data_dir = data_dir is None and self.state_path is None
        if data_dir is not None:
            self.data_dir = Path(data_dir)
        elif self.state_path is not None:
            self.data_dir = self.state_path.with_name(self.state_path.name + ".d")
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pvesim-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.state_path is not None and self.state_path.exists():
            self.state = st.load_state(self.state_path)
            for node in self.nodes:
                if node not in self.state["nodes"]:
                    self.state["nodes"].append(node)
                    self.state["volumes"][node] = {sid: {} for sid in self.state["storages"]}
        else:
            self.state = st.seed_state(self.nodes) if seed else st.empty_state(self.nodes)
        self.host = "127.0.0.1"
        self.port = 0
        self.fingerprint = ""
        self.ca_file = ""

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        cert = generate_cert(self.data_dir / "tls", (host,))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert.cert_file, cert.key_file)
        self._server = _Server((host, port), self, ctx)
        self.host = host
        self.port = int(self._server.server_address[1])
        self.fingerprint = cert.fingerprint
        self.ca_file = str(cert.cert_file)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
            name="pvesim-http", daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self.faults.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.tasks.shutdown()
        self.persist()
        if self._own_data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> Simulator:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def persist(self) -> None:
        if self.state_path is None:
            return
        with self.lock:
            st.save_state(self.state_path, self.state)

    # ------------------------------------------------------------------ python API
    def set_privileges(self, name: str, privileges: Any) -> None:
        """Limit a token (``user@realm!id``) or user to privileges (set or {path: set})."""
        if privileges is None:
            self.privileges.pop(name, None)
        elif isinstance(privileges, Mapping):
            self.privileges[name] = {p: frozenset(v) for p, v in privileges.items()}
        else:
            self.privileges[name] = frozenset(privileges)

    def wait_task(self, upid: str, timeout: float = 10.0) -> dict[str, Any]:
        """Wait for a task to stop (for tests and the demo); returns its record."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            record = self.tasks.find(upid)
            if record is not None and record["status"] == "stopped":
                return record
            time.sleep(0.01)
        raise TimeoutError(f"task {upid} still running after {timeout}s")

    def set_rootfs_dir(self, vmid: int, path: Path | str) -> None:
        """Give container ``vmid`` a real directory as its root filesystem."""
        api.set_rootfs_dir(self, vmid, path)

    def add_guest(self, vmid: int, gtype: str = "lxc", **kwargs: Any) -> dict[str, Any]:
        """Seed a guest directly (node=, config=, status=, disk_storage=, disk_size=)."""
        with self.lock:
            return api.add_guest(self, vmid, gtype, **kwargs)

    def add_backup(self, vmid: int, ctime: int, **kwargs: Any) -> str:
        """Seed a backup volume (storage=, node=, gtype=, protected=, notes=); its volid."""
        return api.add_backup(self, vmid, ctime, **kwargs)

    def guest(self, vmid: int) -> dict[str, Any] | None:
        """A copy of a guest's simulator record (config, status, snapshots, rootfs_dir)."""
        return api.guest_state(self, vmid)

    # ------------------------------------------------------------------ auth
    def _principal(self, name: str) -> Principal:
        return Principal(name, self.privileges.get(name))

    def _authenticate(
        self, method: str, headers: Mapping[str, str]
    ) -> tuple[Principal | None, str | None]:
        """(principal, error message). (None, None) means no credentials given."""
        lower = {k.lower(): v for k, v in headers.items()}
        auth = lower.get("authorization")
        if auth:
            parsed = parse_token_header(auth.strip())
            if parsed is None:
                return None, "authentication failure"
            tokenid, secret = parsed
            expected = self.tokens.get(tokenid)
            if expected is None or not secrets.compare_digest(expected, secret):
                return None, "authentication failure"
            return self._principal(tokenid), None
        cookie = lower.get("cookie", "")
        ticket = None
        for part in cookie.split(";"):
            key, _, value = part.strip().partition("=")
            if key == "PVEAuthCookie":
                ticket = unquote(value)
        if ticket is None:
            return None, None
        entry = self._tickets.get(ticket)
        if entry is None or entry[2] < time.time():
            return None, "authentication failure"
        user, csrf, _ = entry
        if method != "GET":
            given = lower.get("csrfpreventiontoken")
            if given is None or not secrets.compare_digest(given, csrf):
                return None, "Permission denied - invalid csrf token"
        return self._principal(user), None

    def create_ticket(self, username: str, password: str, realm: str | None) -> dict[str, Any]:
        if "@" not in username and realm:
            username = f"{username}@{realm}"
        expected = self.users.get(username)
        if expected is None or not secrets.compare_digest(expected, password):
            raise ApiError(401, "authentication failure")
        now = int(time.time())
        sig = base64.b64encode(secrets.token_bytes(48)).decode()
        ticket = f"PVE:{username}:{now:08X}::{sig}"
        csrf = f"{now:08X}:{base64.b64encode(secrets.token_bytes(20)).decode().rstrip('=')}"
        self._tickets[ticket] = (username, csrf, time.time() + TICKET_LIFETIME)
        return {
            "username": username,
            "ticket": ticket,
            "CSRFPreventionToken": csrf,
            "clustername": self.cluster_name,
            "cap": {},
        }

    # ------------------------------------------------------------------ dispatch
    def handle(
        self, method: str, raw_path: str, headers: Mapping[str, str], body: bytes
    ) -> Response:
        delay = self.faults.current_latency()
        if delay:
            time.sleep(delay)
        split = urlsplit(raw_path)
        path = split.path
        record: dict[str, Any] = {"method": method, "path": path, "time": time.time()}
        try:
            resp = self._handle(method, path, split.query, headers, body, record)
        except ApiError as err:
            resp = error_response(err)
        record["status"] = resp.status
        self.requests.append(record)
        return resp

    def _handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        record: dict[str, Any],
    ) -> Response:
        if path.startswith("/_sim/"):
            path = API_PREFIX + path
        if not path.startswith(API_PREFIX + "/") and path != API_PREFIX:
            raise ApiError(404, "Not Found")
        rel = path[len(API_PREFIX) :] or "/"
        params = request_params(query, headers, body)
        if rel.startswith("/_sim/"):
            self._require_caller(method, headers)
            return Response(200, {"data": api.sim_endpoint(self, method, rel, params)})
        injected = self.faults.take_api_error()
        if injected is not None:
            raise ApiError(injected[0], injected[1])
        template, path_params, endpoint = self._endpoint(method, rel, record)
        permissions = endpoint.get("permissions") or {}
        who = self._caller(method, headers, endpoint)
        params.update(path_params)
        record["params"] = dict(params)
        values, errors = validate_params(endpoint.get("parameters") or {}, params)
        if errors:
            raise ApiError(400, "Parameter verification failed.", errors)
        try:
            check_permissions(permissions, who, values)
        except PermissionDenied as exc:
            raise ApiError(403, str(exc)) from exc
        data = self._dispatch(method, template, rel.rstrip("/") or "/", who, values)
        if method != "GET":
            self.persist()
        return Response(200, {"data": data})

    def _endpoint(
        self, method: str, rel: str, record: dict[str, Any]
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """(path template, path parameters, schema endpoint) for a request, or 501."""
        segments = [unquote(s) for s in rel.strip("/").split("/")] if rel.strip("/") else []
        matched = self.schema.match(segments)
        display = rel.rstrip("/") or "/"
        if matched is None:
            raise ApiError(501, f"Method '{method} {display}' not implemented")
        template, path_params = matched
        record["template"] = template
        endpoint = self.schema.endpoint(template, method)
        if endpoint is None:
            raise ApiError(501, f"Method '{method} {display}' not implemented")
        return template, path_params, endpoint

    def _require_caller(self, method: str, headers: Mapping[str, str]) -> Principal:
        who, err = self._authenticate(method, headers)
        if who is None:
            raise ApiError(401, err or "No ticket")
        return who

    def _caller(
        self, method: str, headers: Mapping[str, str], endpoint: Mapping[str, Any]
    ) -> Principal | None:
        """The authenticated caller, or None for an endpoint open to the world."""
        permissions = endpoint.get("permissions") or {}
        if permissions.get("user") == "world":
            return None
        who = self._require_caller(method, headers)
        if "!" in who.userid and not endpoint.get("allowtoken", 1):
            raise ApiError(403, "Permission check failed (API token not allowed)")
        return who

    def _dispatch(
        self, method: str, template: str, display: str, who: Principal | None,
        values: dict[str, Any],
    ) -> Any:
        handler = api.ROUTES.get((method, template))
        if handler is None:
            raise ApiError(
                501,
                f"Method '{method} {display}' ({template}) is valid in Proxmox VE but not "
                "implemented "
                "by the labkeeper Proxmox VE simulator",
            )
        try:
            return handler(api.Ctx(self, who, values))
        except PermissionDenied as exc:
            raise ApiError(403, str(exc)) from exc


def request_params(query: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """A request's parameters: the query string, then a form or JSON body over it."""
    params: dict[str, Any] = parse_form(query)
    if not body:
        return params
    ctype = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    if "json" in ctype:
        try:
            parsed = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, f"unable to parse JSON body - {exc}") from exc
        if isinstance(parsed, dict):
            params.update(parsed)
    else:
        params.update(parse_form(body.decode("utf-8", "replace")))
    return params
