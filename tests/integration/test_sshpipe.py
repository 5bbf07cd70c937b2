"""The SSH bridge (labkeeper.sshpipe): a local process that is a remote command, over
the local sshd."""

from __future__ import annotations

import os
import select
import subprocess
import time

from labkeeper import sshpipe
from labkeeper.locallab.ports import free_port
from tests.fixtures.procs import process_argvs


def _readline(stream, timeout: float = 30) -> bytes:
    """One line, or b"" if none came within ``timeout`` (never hangs the test)."""
    ready, _, _ = select.select([stream], [], [], timeout)
    return stream.readline() if ready else b""


def _env(target, **extra: str) -> dict[str, str]:
    return {**os.environ, **sshpipe.bridge_env(target), **extra}


def test_bridge_relays_stdin_as_it_arrives_and_exits_with_the_remote_status(ssh_target):
    argv = [*sshpipe.bridge_prefix(timeout=60), "sh", "-c",
            'while read -r l; do echo "got $l"; [ "$l" = bye ] && exit 7; done']
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env(ssh_target))
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"one\n")
    proc.stdin.flush()
    assert _readline(proc.stdout) == b"got one\n"  # answered before stdin ended
    proc.stdin.write(b"bye\n")
    proc.stdin.flush()
    assert _readline(proc.stdout) == b"got bye\n"
    assert proc.wait(timeout=60) == 7


def test_bridge_hands_variables_over_by_name_and_their_values_are_in_no_argv(ssh_target):
    secret = "lk-" + os.urandom(8).hex()
    argv = [*sshpipe.bridge_prefix(env_names=("LK_SECRET",), timeout=60), "sh", "-c",
            'echo "$LK_SECRET"; read -r _; exit 0']
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env=_env(ssh_target, LK_SECRET=secret))
    assert proc.stdin is not None and proc.stdout is not None
    assert _readline(proc.stdout) == secret.encode() + b"\n"  # the remote side has it
    leaks = [a for _, a in process_argvs() if any(secret.encode() in x for x in a)]
    remote = [a for _, a in process_argvs() if b"LK_SECRET" in b" ".join(a)
              and not a[0].endswith(b"python")]
    proc.stdin.close()
    assert proc.wait(timeout=60) == 0
    assert not leaks, leaks
    assert remote  # the scan saw the remote command (sshd's child) while it ran


def test_bridge_exits_255_with_the_reason_when_the_host_cannot_be_reached(ssh_target):
    import dataclasses

    dead = dataclasses.replace(ssh_target, port=free_port(), connect_timeout=3.0)
    started = time.monotonic()
    res = subprocess.run([*sshpipe.bridge_prefix(timeout=30), "true"], env=_env(dead),
                         capture_output=True, timeout=60)
    assert res.returncode == sshpipe.LOST and res.stdout == b""
    assert b"labkeeper ssh bridge" in res.stderr and time.monotonic() - started < 30
