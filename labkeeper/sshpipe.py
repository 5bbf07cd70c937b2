"""A local process that is a remote command: stdin, stdout, stderr and exit status
carried over labkeeper's SSH runner (:mod:`labkeeper.ssh`).

``python -m labkeeper.sshpipe [--timeout S] [--env NAME]... -- ARGV...`` runs ARGV
on the target described (as JSON, references only) in ``$LABKEEPER_SSHPIPE_TARGET``
and behaves like it: our stdin goes to its stdin as it arrives, its stdout comes
out on ours byte for byte, its stderr on ours, and we exit with its exit status.
So a remote producer can be a stage of :func:`labkeeper.process.pipeline`, and the
pipeline keeps every guarantee it gives local producers: the consumer gets
end-of-stream only when this process exited 0 and the gate accepted the stream.

Failures are never a clean end: a connection that cannot be made or is lost, a
remote command killed by a signal (no exit status), our stdout closed under us:
exit :data:`LOST` (255, as OpenSSH's ``ssh`` does) with the reason on stderr.

Secrets: each ``--env NAME`` is a *name*; its value comes from our own
environment and travels to the remote side on the channel's stdin
(:data:`labkeeper.ssh.ENV_PREAMBLE`), never on any command line. The SSH key is a
reference resolved here (``file:``, ``env:``, ``prefect-block:``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TARGET_ENV = "LABKEEPER_SSHPIPE_TARGET"
LOST = 255
DEFAULT_TIMEOUT = 24 * 3600.0
LOST_WORDS = "the SSH server closed the connection"
"""Said when the connection could not be made or was lost: it contains libpq's
"server closed the connection", which :mod:`labkeeper.restic` and
:mod:`labkeeper.postgres` already treat as transient (worth a retry)."""


def target_json(target: Any) -> str:
    """The bridge's target description (pure): an :class:`labkeeper.ssh.SshTarget`
    with references only (the key is ``file:``/``env:``/``prefect-block:``)."""
    return json.dumps({
        "name": target.name, "host": target.host, "key": target.key,
        "known_hosts": str(target.known_hosts), "port": target.port, "user": target.user,
        "trust_on_first_use": target.trust_on_first_use,
        "connect_timeout": target.connect_timeout, "key_passphrase": target.key_passphrase,
        "host_key": target.host_key}, sort_keys=True)


def bridge_prefix(*, env_names: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT
                  ) -> tuple[str, ...]:
    """The local argv in front of a remote argv (pure)."""
    argv: tuple[str, ...] = (sys.executable, "-m", "labkeeper.sshpipe",
                             "--timeout", f"{timeout:g}")
    for name in env_names:
        argv += ("--env", name)
    return (*argv, "--")


def bridge_env(target: Any) -> dict[str, str]:
    return {TARGET_ENV: target_json(target)}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def run(argv: Sequence[str], *, environ: Mapping[str, str], timeout: float,
        env_names: Sequence[str]) -> int:
    from labkeeper import ssh
    from labkeeper.errors import LabkeeperError, SSHConnectError

    raw = json.loads(environ[TARGET_ENV])
    raw["known_hosts"] = Path(raw["known_hosts"])
    target = ssh.SshTarget(**raw)
    env = {n: environ[n] for n in env_names if n in environ}

    def err_line(line: str) -> None:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

    try:
        with ssh.connect(target) as client:
            res = client.run(tuple(argv), timeout=timeout, env=env or None,
                             stdin=sys.stdin.buffer, stdout_writer=lambda b: _write_all(1, b),
                             on_stderr_line=err_line, check=False)
    except SSHConnectError as exc:  # retry-worthy: said in words the callers know
        err_line(f"labkeeper ssh bridge to {target.name}: {exc} ({LOST_WORDS})")
        return LOST
    except LabkeeperError as exc:
        err_line(f"labkeeper ssh bridge to {target.name}: {exc}")
        return LOST
    except Exception as exc:  # paramiko's EOFError & co.: never a clean end
        err_line(f"labkeeper ssh bridge to {target.name}: connection lost while running "
                 f"{argv[0]} ({type(exc).__name__}: {exc}; {LOST_WORDS})")
        return LOST
    if not 0 <= res.returncode < LOST:
        err_line(f"labkeeper ssh bridge to {target.name}: {argv[0]} ended without an exit "
                 "status (killed by a signal, or the connection was lost)")
        return LOST
    return res.returncode


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkeeper.sshpipe")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    parser.add_argument("--env", action="append", default=[])
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    if not argv or TARGET_ENV not in os.environ:
        parser.error(f"needs a command and ${TARGET_ENV}")
    return run(argv, environ=os.environ, timeout=ns.timeout, env_names=ns.env)


if __name__ == "__main__":
    sys.exit(main())
