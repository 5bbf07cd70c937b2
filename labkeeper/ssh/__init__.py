"""SSH runner (paramiko): strict host keys, remote commands with streaming output, SFTP.

Same result and error types as :mod:`labkeeper.process`: a remote command returns a
:class:`~labkeeper.process.CommandResult` (``host`` = the target's name) and a
failure raises the :class:`~labkeeper.errors.CommandError` built by
:func:`~labkeeper.process.make_error`.

Secrets for remote commands never go on the command line (visible in the remote
``ps``): ``input=`` reaches the command's stdin, and ``env=`` travels on stdin too,
as ``NAME=value`` lines read by a fixed ``sh -c`` preamble (:data:`ENV_PREAMBLE`)
that exports them and execs the command. Anything logged or raised is masked with
:func:`labkeeper.secrets.redact`.

Modules: :mod:`.target`, :mod:`.hostkeys` (fingerprints, known_hosts, policies),
:mod:`.connect`, :mod:`.command` (the remote command line), :mod:`.channel`
(streaming one command), :mod:`.client` (:class:`SshClient`: exec and SFTP),
:mod:`.pool`.
"""

from labkeeper.ssh.client import RemoteStat, Sink, Source, SshClient, SshSession
from labkeeper.ssh.command import (
    ENV_PREAMBLE,
    REMOTE_DEADLINE_MARGIN,
    REMOTE_KILL_AFTER,
    deadline_argv,
    env_argv,
    env_block,
    remote_command,
)
from labkeeper.ssh.connect import connect, load_private_key
from labkeeper.ssh.hostkeys import (
    append_known_host,
    fingerprint,
    host_key_name,
    key_fingerprint,
    known_hosts_line,
    pinned_fingerprint,
)
from labkeeper.ssh.pool import SshPool
from labkeeper.ssh.target import SshTarget

__all__ = [
    "ENV_PREAMBLE",
    "REMOTE_DEADLINE_MARGIN",
    "REMOTE_KILL_AFTER",
    "RemoteStat",
    "Sink",
    "Source",
    "SshClient",
    "SshPool",
    "SshSession",
    "SshTarget",
    "append_known_host",
    "connect",
    "deadline_argv",
    "env_argv",
    "env_block",
    "fingerprint",
    "host_key_name",
    "key_fingerprint",
    "known_hosts_line",
    "load_private_key",
    "pinned_fingerprint",
    "remote_command",
]
