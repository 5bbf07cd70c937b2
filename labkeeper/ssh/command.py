"""The remote command line, the one place a shell string is built.

SSH carries one command *string*, which the remote user's login shell parses
(it must be POSIX: sh, dash, bash, zsh; not fish or csh). :func:`remote_command`
quotes each argv element with :func:`shlex.join`, so it arrives as exactly one
argument. Environment variables travel on stdin to :data:`ENV_PREAMBLE` (never on
the command line, never through the SSH ``env`` request, which sshd refuses unless
``AcceptEnv`` allows the name); the remote ``timeout`` program enforces deadlines.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence

from labkeeper.process import check_argv

_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

ENV_PREAMBLE = (
    'while IFS= read -r __lk_kv; do [ -z "$__lk_kv" ] && break; export "$__lk_kv"; done; '
    'unset __lk_kv; exec "$@"'
)
"""The fixed ``sh -c`` script that reads ``NAME=value`` lines from stdin up to an
empty line, exports them and execs the real argv (``"$@"``). Values are never
re-parsed by the shell (``export "$var"`` assigns the text as is); ``read``
consumes stdin byte by byte, so the rest of stdin reaches the command intact."""


def remote_command(argv: Sequence[str]) -> str:
    """The one remote command string for ``argv``: each element quoted with
    :func:`shlex.join`, so it reaches the remote program as one argument."""
    argv = tuple(argv)
    check_argv(argv)
    return shlex.join(argv)


def env_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """``argv`` wrapped in the :data:`ENV_PREAMBLE` that reads variables from stdin."""
    return ("sh", "-c", ENV_PREAMBLE, "labkeeper-env", *argv)


def env_block(env: Mapping[str, str]) -> bytes:
    """The stdin prefix carrying ``env`` for :data:`ENV_PREAMBLE`: ``NAME=value``
    lines and an empty line. Names must be shell identifiers; values may not hold
    newlines or NUL bytes."""
    lines = []
    for name, value in env.items():
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"environment variable name {name!r} is not an identifier")
        if "\n" in value or "\r" in value or "\x00" in value:
            raise ValueError(f"environment variable {name}: value contains a newline or NUL")
        lines.append(f"{name}={value}\n")
    return ("".join(lines) + "\n").encode("utf-8")


REMOTE_KILL_AFTER = 5  # seconds between the remote SIGTERM and SIGKILL
REMOTE_DEADLINE_MARGIN = 1.0  # the remote deadline trails ours by this much


def deadline_argv(argv: Sequence[str], timeout: float) -> tuple[str, ...]:
    """``argv`` under the remote ``timeout`` program (coreutils or busybox).

    Closing an SSH channel does not stop a command started without a PTY, and
    OpenSSH refuses the "signal" request for root sessions (no privilege
    separation after a root login); so the remote side enforces the deadline:
    SIGTERM to the command's process group ``REMOTE_DEADLINE_MARGIN`` after our
    own deadline, SIGKILL ``REMOTE_KILL_AFTER`` seconds later. It also holds
    when the connection is lost mid-command."""
    seconds = f"{timeout + REMOTE_DEADLINE_MARGIN:.3f}".rstrip("0").rstrip(".")
    return ("timeout", "-s", "TERM", "-k", str(REMOTE_KILL_AFTER), seconds, *argv)
