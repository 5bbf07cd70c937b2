"""`labkeeper runner`: the warm runner ("zygote") that flow commands fork from.

A fresh `labkeeper backup run` spends ~2 s importing Prefect, the command line and the
flows before any work. This process imports them once, then waits on a Unix socket
(mode 0600, beside the local Prefect server; peers of another uid are refused). For
each command a client (cli/runner_client.py) sends, it forks: the child takes the
client's environment, working directory and stdin/stdout/stderr, rebuilds Prefect's
settings from that environment and runs the command exactly as the command line would
(cli.main.run_in_process). The runner sends the child's pid first and its exit status
last. It stays single-threaded (it never starts Prefect's API, log or event workers:
a fork copies only the calling thread), and it stops serving when its code changed
on disk (a later command starts a fresh one), on SIGTERM, or when its socket is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import hashlib
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli import runner_client as rc
from deployments import warm_start
from flows import prefect_tls

logger = logging.getLogger("labkeeper.runner")  # printed like labkeeper's records

# What a flow command imports (cli.main's _FLOW_COMMANDS): loaded once, here.
PRELOAD = ("cli.app", "cli.jobs", "cli.report", "cli.runbook", *warm_start.PRELOAD)
REQUEST_TIMEOUT = 5.0  # a client sends its request at once; a stuck one is dropped
MAX_REQUEST = 16 * 1024 * 1024
HANDLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
CLIENT_GONE_GRACE = 30.0  # SIGINT first (the run ends as on Ctrl-C), SIGKILL after


def preload() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() != 1:  # forking a threaded process copies held locks
        names = [t.name for t in threading.enumerate()]
        raise RuntimeError(f"the runner must stay single-threaded; threads: {names}")
    _PREFECT_AT_PRELOAD[:] = [settings_key(os.environ, os.getcwd())]
    prefect_tls.warm()  # the children inherit the TLS context Prefect's clients share
    gc.freeze()  # the imported objects stay shared with the children (copy-on-write)


@dataclass
class Child:
    conn: socket.socket
    pidfd: int


@dataclass
class Zygote:
    path: Path
    stamp: str
    listener: socket.socket
    lock_fd: int
    sel: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    children: dict[int, Child] = field(default_factory=dict)
    wake: tuple[int, int] = (-1, -1)
    listening: bool = True
    inode: int = 0  # of the socket file we bound: we remove only that one

    # -- the loop --------------------------------------------------------------------
    def loop(self) -> None:
        self.inode = self.path.stat().st_ino
        self.wake = os.pipe()
        for fd in self.wake:
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake[1])
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: None)  # seen through the wake-up fd
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self.sel.register(self.wake[0], selectors.EVENT_READ, self._signalled)
        logger.info("runner %d: serving on %s", os.getpid(), self.path)
        while self.listening or self.children:
            for key, _ in self.sel.select(timeout=60.0):
                key.data()
            if self.listening and not self._socket_is_ours():
                self.stop_listening("its socket was removed or replaced")

    def _signalled(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self.wake[0], 512)
        self.stop_listening("stopped by a signal")

    def stop_listening(self, why: str) -> None:
        """New commands run in their own process from now on; running ones finish."""
        if not self.listening:
            return
        logger.info("runner %d: no longer serving (%s); %d command(s) running",
                    os.getpid(), why, len(self.children))
        self.listening = False
        self.sel.unregister(self.listener)
        if self._socket_is_ours():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self.listener.close()
        os.close(self.lock_fd)  # a new runner may start now

    def _socket_is_ours(self) -> bool:
        try:
            return self.path.stat().st_ino == self.inode
        except OSError:
            return False

    # -- one command -----------------------------------------------------------------
    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        fds: list[int] = []
        try:
            why = rc.peer_refusal(rc.peer_uid(conn), os.getuid())
            if why:
                logger.warning("runner: refused a connection: %s", why)
                conn.close()
                return
            conn.settimeout(REQUEST_TIMEOUT)
            req, fds = receive_request(conn)
        except (OSError, ValueError) as exc:
            logger.debug("runner: dropped a request: %s", exc)
            _close_all(fds)
            conn.close()
            return
        if req.get("stamp") != self.stamp:
            with contextlib.suppress(OSError):
                rc.send_message(conn, {"refused": "the runner runs other code"})
            _close_all(fds)
            conn.close()
            if rc.code_stamp() != self.stamp:
                self.stop_listening("labkeeper's code changed on disk")
            return
        self._fork(conn, req, fds)

    def _fork(self, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
        go_r, go_w = os.pipe()
        for stream in (sys.stdout, sys.stderr):  # nothing of ours reaches the client's
            stream.flush()
        # A signal to the child before it drops our handlers would reach our wake-up
        # pipe: held back until the child's own handlers are in place.
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child (measured through its output)
            code = 70
            try:
                os.close(go_w)
                self._become_child()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                if os.read(go_r, 1) == b"g":  # the client knows our pid: run
                    os.close(go_r)
                    code = child_main(conn, req, fds)
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
        os.close(go_r)
        _close_all(fds)
        try:
            rc.send_message(conn, {"pid": pid})
            os.write(go_w, b"g")
        except OSError:  # the client went away before the command started
            os.kill(pid, signal.SIGKILL)
        finally:
            os.close(go_w)
        pidfd = os.pidfd_open(pid)
        self.children[pid] = Child(conn, pidfd)
        self.sel.register(pidfd, selectors.EVENT_READ, lambda: self._reap(pid))

    def _become_child(self) -> None:
        """In the fork: drop everything of the runner's (signals, sockets, children)."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        self.sel.close()
        fds = [*self.wake, *(c.pidfd for c in self.children.values())]
        if self.listening:
            fds.append(self.lock_fd)
            self.listener.close()
        _close_all(fds)
        for c in self.children.values():
            c.conn.close()
        os.setpgid(0, 0)  # a signal to the runner's group does not reach commands

    def _reap(self, pid: int) -> None:
        _, status = os.waitpid(pid, 0)
        child = self.children.pop(pid)
        self.sel.unregister(child.pidfd)
        os.close(child.pidfd)
        with contextlib.suppress(OSError):  # the child said it already, or the client left
            rc.send_message(child.conn, {"exit": os.waitstatus_to_exitcode(status)})
        child.conn.close()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def receive_request(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """The client's request and its stdin/stdout/stderr (three descriptors)."""
    head, fds, _flags, _addr = socket.recv_fds(conn, rc.HEADER.size, 3)
    if len(head) != rc.HEADER.size or len(fds) != 3:
        _close_all(fds)
        raise ValueError("a request without its header and three descriptors")
    (size,) = rc.HEADER.unpack(head)
    if size > MAX_REQUEST:
        _close_all(fds)
        raise ValueError(f"a request of {size} bytes")
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(65536, size - got))
        if not chunk:
            _close_all(fds)
            raise ValueError("the request ended early")
        chunks.append(chunk)
        got += len(chunk)
    return json.loads(b"".join(chunks)), list(fds)


# -- the child ---------------------------------------------------------------------------
def child_main(conn: socket.socket, req: dict[str, Any], fds: list[int]) -> int:
    """Become the client's command: its environment, directory and descriptors."""
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    _close_all(fds)
    sys.argv = list(req["argv"])
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(line_buffering=sys.stdout.isatty())  # type: ignore[union-attr]
    fresh_consoles()
    conn.settimeout(None)  # the request's deadline is over: it waits for the client's end
    done = threading.Event()
    threading.Thread(target=_watch_client, args=(conn, done), name="labkeeper-runner-client",
                     daemon=True).start()
    from cli import main

    try:
        code = main.run_in_process(sys.argv[1:], before_app=refresh_prefect)
    except BaseException:  # what the interpreter does with an uncaught error
        sys.excepthook(*sys.exc_info())
        code = 1
    code = finish(code)
    done.set()
    with contextlib.suppress(OSError):
        rc.send_message(conn, {"exit": code})
    return code


def finish(code: int) -> int:
    """What interpreter exit does before the process ends: wait for non-daemon threads,
    run atexit handlers (Prefect flushes its logs and events there), flush stdio."""
    import atexit

    shutdown = getattr(threading, "_shutdown", None)
    with contextlib.suppress(Exception):
        if shutdown is not None:
            shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return code


def _watch_client(conn: socket.socket, done: threading.Event) -> None:
    """The client closing its socket (killed, say) ends the command: SIGINT, as on
    Ctrl-C, then SIGKILL if it has not ended after a grace period."""
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    if done.is_set():
        return
    os.kill(os.getpid(), signal.SIGINT)
    if not done.wait(CLIENT_GONE_GRACE):
        os.kill(os.getpid(), signal.SIGKILL)


def fresh_consoles() -> None:
    """rich Consoles made at import looked at the runner's stdout (no terminal, no
    colours, its width): make them again for the client's."""
    from rich.console import Console

    for name, module in list(sys.modules.items()):
        if not name.startswith("cli.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, Console):
                setattr(module, attr, Console(stderr=value.stderr))


SettingsKey = tuple[tuple[tuple[str, str], ...], tuple[object, ...]]
_PREFECT_AT_PRELOAD: list[SettingsKey] = []  # settings_key() where Prefect set itself up


def _content(path: str, needle: str = "") -> str | None:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    if needle and needle not in text:
        return None
    return hashlib.sha256(text.encode()).hexdigest()


def logging_key(environ: Mapping[str, str], cwd: str) -> tuple[object, ...]:
    """What Prefect's logging set-up is made of: the PREFECT_LOGGING_* variables, the
    files that may set them (the profiles file and logging.yml, by content, wherever
    PREFECT_HOME puts them; ``.env``, ``prefect.toml`` and a ``[tool.prefect]``
    pyproject.toml in the working directory) and whether stderr is a terminal
    (Prefect's console handler styles for one)."""
    home = environ.get("PREFECT_HOME") or os.path.join(environ.get("HOME", "/root"),
                                                        ".prefect")
    files = (_content(environ.get("PREFECT_PROFILES_PATH")
                      or os.path.join(home, "profiles.toml")),
             _content(environ.get("PREFECT_LOGGING_CONFIG_PATH")
                      or os.path.join(home, "logging.yml")),
             _content(os.path.join(cwd, ".env")), _content(os.path.join(cwd, "prefect.toml")),
             _content(os.path.join(cwd, "pyproject.toml"), "[tool.prefect"))
    env = tuple(sorted((k, v) for k, v in environ.items()
                       if k.startswith("PREFECT_LOGGING_") or k == "PREFECT_PROFILE"))
    return env, files, os.isatty(2)


def settings_key(environ: Mapping[str, str], cwd: str) -> SettingsKey:
    """What Prefect's settings are built from: every PREFECT_ variable, HOME (where
    ``~/.prefect`` is) and the files of :func:`logging_key`, which is part of it. Equal
    keys, equal settings: a runner child whose key is the runner's keeps them."""
    env = tuple(sorted((k, v) for k, v in environ.items()
                       if k.startswith("PREFECT_") or k == "HOME"))
    return env, logging_key(environ, cwd)


def refresh_prefect() -> None:
    """Prefect built its settings and logging from the runner's environment at import:
    build them again from this command's (the API URL, the profile, logging levels).
    Nothing is rebuilt where this command's :func:`settings_key` is the runner's (the
    settings ≈25 ms); the logging set-up (≈50 ms) only where the :func:`logging_key`
    part differs: the same settings give the same handlers."""
    import prefect.context
    from prefect.logging import configuration

    from labkeeper import log_setup

    at_preload = _PREFECT_AT_PRELOAD[0] if _PREFECT_AT_PRELOAD else None
    key = settings_key(os.environ, os.getcwd())
    if at_preload == key:
        logger.debug("runner: Prefect's settings and logging kept as the runner built them")
        return
    if at_preload is not None:
        differ = sorted({k for k, _v in set(at_preload[0]) ^ set(key[0])})
        logger.debug("runner: Prefect's settings built again (%s differ)",
                     ", ".join(differ) or "settings files")
    if at_preload is not None and at_preload[1] == key[1]:
        prefect.context.refresh_global_settings_context()
        logger.debug("runner: Prefect's logging kept as the runner set it up")
        return
    old = list(logging.getLogger("prefect.extra").handlers)
    for lg in [logging.getLogger(), *(logging.getLogger(n) for n in
                                     list(logging.root.manager.loggerDict))]:
        for handler in old:
            lg.removeHandler(handler)
    prefect.context.refresh_global_settings_context()
    configuration.PROCESS_LOGGING_CONFIG.clear()
    configuration.setup_logging(incremental=False)
    log_setup.capture_in_prefect_runs()


# -- start ---------------------------------------------------------------------------------
def listen(path: Path) -> tuple[socket.socket, int] | None:
    """Bind ``path`` (0600) under the runner lock; None when another runner holds it."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    for attempt in range(5):  # a prober (local_server.runner_alive) holds it for µs
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if attempt == 4:
                os.close(lock_fd)
                return None
            threading.Event().wait(0.02)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a runner that was killed left it
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(umask)
    os.chmod(path, 0o600)
    listener.listen(64)
    return listener, lock_fd


def serve(path: Path) -> int:
    """The `labkeeper runner` command: preload, listen, fork a child per command."""
    path = path.absolute()
    preload()
    stamp = rc.code_stamp()
    bound = listen(path)
    if bound is None:
        logger.info("runner: another runner serves %s", path)
        return 0
    Zygote(path, stamp, *bound).loop()
    return 0
