"""The thin side of the warm runner: hand a flow command to `labkeeper runner`.

Importing the command line, Prefect and the flows costs ~2 s in every fresh process.
The runner (cli/runner.py) has them imported already and forks one child per command.
This module is what `labkeeper <flow command>` tries first, before importing anything
heavy: it connects to the runner's Unix socket (beside the local Prefect server, in the
user's state directory), sends the argv, the working directory, the whole environment
(secrets included: in memory, over a 0600 socket, to a process of the same user only)
and its stdin/stdout/stderr file descriptors, forwards SIGINT/SIGTERM/SIGHUP to the
child, and returns the child's exit status. ``None`` means "not handled, run it here":
no runner, a stale or foreign one, ``LABKEEPER_NO_RUNNER=1`` (said only at debug level).

Only the standard library: this module must stay cheap to import.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from labkeeper.code_stamp import PIN, code_stamp  # noqa: F401  (stdlib only)

SOCKET_NAME = "runner.sock"
NO_RUNNER = "LABKEEPER_NO_RUNNER"
HEADER = struct.Struct("!I")  # the length of the JSON request that follows
PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
CONNECT_TIMEOUT = 2.0
# The runner answers with the child's pid within milliseconds; a runner that does not
# answer for this long is wedged: the command runs here instead.
ANSWER_TIMEOUT = 30.0
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def socket_path(environ: Mapping[str, str]) -> str:
    """``<local server home>/runner.sock`` (labkeeper.local_server.local_server's home,
    computed here without importing it: that import costs a quarter of a second)."""
    home = environ.get("LABKEEPER_PREFECT_HOME")
    if not home:
        state = environ.get("XDG_STATE_HOME") or os.path.join(environ.get("HOME", "/root"),
                                                               ".local", "state")
        home = os.path.join(state, "labkeeper", "prefect")
    return os.path.join(home, SOCKET_NAME)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
    return int(PEERCRED.unpack(raw)[1])


def peer_refusal(uid: int, own_uid: int) -> str | None:
    """Why a peer may not talk to us (None: it may): only our own user."""
    return None if uid == own_uid else f"peer uid {uid} is not {own_uid}"


def send_message(sock: socket.socket, message: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _debug(message: str) -> None:
    if os.environ.get("LABKEEPER_LOG_LEVEL", "").strip().upper() == "DEBUG":
        print(f"labkeeper: runner: {message}", file=sys.stderr)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT)
        sock.connect(path)
        why = peer_refusal(peer_uid(sock), os.getuid())
        if why:  # not our runner: it must not see our environment
            raise PermissionError(why)
    except BaseException:
        sock.close()
        raise
    return sock


def request(argv: list[str], environ: Mapping[str, str]) -> bytes:
    return json.dumps({"stamp": code_stamp(environ=environ), "argv": argv, "cwd": os.getcwd(),
                       "env": dict(environ)}).encode()


def _messages(reader: BinaryIO) -> Iterator[dict[str, Any]]:
    for line in reader:
        yield json.loads(line)


@contextlib.contextmanager
def _forwarding(pid: int) -> Iterator[None]:
    """Our SIGINT/SIGTERM/SIGHUP go to the child (Ctrl-C, `kill`, a closed terminal)."""
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    before = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def exit_code(status: int) -> int:
    """The runner's status (os.waitstatus_to_exitcode: -N for signal N) as a shell
    would say it."""
    return 128 - status if status < 0 else status


def run(argv: list[str], environ: Mapping[str, str] = os.environ) -> int | None:
    """Run ``labkeeper <argv[1:]>`` in the warm runner; its exit code, or None when the
    command must run in this process instead (nothing has run then)."""
    if environ.get(NO_RUNNER, "").strip() not in ("", "0"):
        return None
    path = socket_path(environ)
    try:
        sock = _connect(path)
    except OSError as exc:
        _debug(f"not used ({path}: {exc})")
        return None
    with sock, sock.makefile("rb") as reader:
        messages = _messages(reader)
        try:
            payload = request(argv, environ)
            socket.send_fds(sock, [HEADER.pack(len(payload))], [0, 1, 2])
            sock.sendall(payload)
            sock.settimeout(ANSWER_TIMEOUT)
            first = next(messages, {"refused": "closed"})
        except (OSError, ValueError) as exc:  # a closed fd 0-2 too: run here
            _debug(f"not used ({exc})")
            return None
        if "pid" not in first:
            _debug(f"not used ({first.get('refused')})")
            return None
        sock.settimeout(None)
        with _forwarding(int(first["pid"])):
            _debug(f"the command runs in the runner's child {first['pid']}")
            try:
                last = next((m for m in messages if "exit" in m), None)
            except (OSError, ValueError):
                last = None
    if last is None:
        print("labkeeper: the runner stopped before the command ended (exit status "
              "unknown)", file=sys.stderr)
        return 1
    return exit_code(int(last["exit"]))
