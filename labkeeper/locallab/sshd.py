"""A throwaway OpenSSH server on a loopback port, for tests and the demo.

Runs Debian's ``/usr/sbin/sshd`` (package ``openssh-server``) as root with a
private configuration in a temp dir: a generated ed25519 host key, a generated
ed25519 user key authorised through ``AuthorizedKeysFile`` in the same dir,
``UsePAM no``, ``StrictModes no``, no passwords, listening on 127.0.0.1 only.
``sshd -f CONFIG -E LOG`` daemonises; we stop it by the PID in its PidFile.

It also writes a ``known_hosts`` file that trusts exactly this server, and can
produce known_hosts files with a *different* key for "wrong host key" tests.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from labkeeper import process
from labkeeper.locallab.ports import free_port, wait_for_port
from labkeeper.locallab.services import is_zombie, log_tail, stop_pid

if TYPE_CHECKING:
    from labkeeper.ssh import SshTarget

SSHD = Path("/usr/sbin/sshd")
PRIVSEP_DIR = Path("/run/sshd")
KeyKind = Literal["ed25519", "ecdsa", "rsa"]


def generate_key(kind: KeyKind = "ed25519", *, comment: str = "") -> tuple[bytes, str]:
    """A new key pair: (OpenSSH-format private key PEM, ``TYPE BASE64 [comment]`` line)."""
    private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    if kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    elif kind == "ecdsa":
        private = ec.generate_private_key(ec.SECP256R1())
    elif kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:  # pragma: no cover - Literal guards it
        raise ValueError(f"unknown key kind {kind!r}")
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                               serialization.PublicFormat.OpenSSH).decode()
    if comment:
        public = f"{public} {comment}"
    return pem, public


def write_private_key(path: Path, pem: bytes) -> Path:
    """Write a private key file readable only by its owner (0600 from creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)
    return path


def sshd_config(*, port: int, host_key: Path, authorized_keys: Path, pid_file: Path,
                listen: str = "127.0.0.1") -> str:
    """The private sshd configuration (pure)."""
    return "\n".join([
        f"Port {port}",
        f"ListenAddress {listen}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        "UsePAM no",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "AllowAgentForwarding no",
        "AllowTcpForwarding no",
        "X11Forwarding no",
        "PrintMotd no",
        "PrintLastLog no",
        "UseDNS no",
        "MaxSessions 64",
        "MaxStartups 64:30:128",
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ])


class LocalSshd:
    """An ``sshd`` on a free loopback port with generated host and user keys.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    def __init__(self, workdir: Path | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, start_timeout: float = 15.0) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="labkeeper-sshd-"))
        self.host = host
        self.port = port or free_port(host)
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.start_timeout = start_timeout
        self.config_path = self.workdir / "sshd_config"
        self.log_path = self.workdir / "sshd.log"
        self.pid_file = self.workdir / "sshd.pid"
        self.host_key_path = self.workdir / "ssh_host_ed25519_key"
        self.user_key_path = self.workdir / "id_ed25519"
        self.authorized_keys_path = self.workdir / "authorized_keys"
        self.known_hosts_path = self.workdir / "known_hosts"
        self.host_public_key = ""
        self.user_public_key = ""
        self.pid: int | None = None

    # -- names ------------------------------------------------------------------------
    @property
    def host_key_name(self) -> str:
        """How known_hosts names this server: ``[127.0.0.1]:PORT``."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def user_key_ref(self) -> str:
        """A secret reference to the user's private key (``file:/...``)."""
        return f"file:{self.user_key_path}"

    def known_hosts_line(self, *, hashed: bool = False) -> str:
        from labkeeper.ssh import known_hosts_line

        kind, b64 = self.host_public_key.split()[:2]
        return known_hosts_line(self.host_key_name, kind, b64, hashed=hashed)

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> LocalSshd:
        if not SSHD.exists():
            raise RuntimeError(f"{SSHD} not found: install Debian's openssh-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)

        host_pem, self.host_public_key = generate_key("ed25519")
        write_private_key(self.host_key_path, host_pem)
        Path(f"{self.host_key_path}.pub").write_text(self.host_public_key + "\n")
        user_pem, self.user_public_key = generate_key("ed25519", comment="labkeeper-test-user")
        write_private_key(self.user_key_path, user_pem)
        Path(f"{self.user_key_path}.pub").write_text(self.user_public_key + "\n")
        self.authorized_keys_path.write_text(self.user_public_key + "\n")
        os.chmod(self.authorized_keys_path, 0o600)
        self.known_hosts_path.write_text(self.known_hosts_line() + "\n")

        self.config_path.write_text(sshd_config(
            port=self.port, host_key=self.host_key_path,
            authorized_keys=self.authorized_keys_path, pid_file=self.pid_file,
            listen=self.host))
        process.run([str(SSHD), "-t", "-f", str(self.config_path)], timeout=15)
        process.run([str(SSHD), "-f", str(self.config_path), "-E", str(self.log_path)],
                    timeout=15)
        try:
            wait_for_port(self.host, self.port, timeout=self.start_timeout)
            self.pid = self._wait_pid()
        except (TimeoutError, RuntimeError) as exc:
            self.stop()
            raise RuntimeError(f"sshd did not come up on {self.host}:{self.port} ({exc}); "
                               f"log:\n{log_tail(self.log_path)}") from None
        return self

    def _wait_pid(self) -> int:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                return int(self.pid_file.read_text().strip())
            time.sleep(0.02)
        raise RuntimeError(f"no PID in {self.pid_file}")

    def _read_pid(self) -> int | None:
        if self.pid is not None:
            return self.pid
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self._read_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not is_zombie(pid)

    def stop(self, *, remove: bool = True) -> None:
        """Stop the listener by its PID (and the per-connection sshd children it
        forked), wait for them to exit, then remove the temp dir."""
        pid = self._read_pid()
        if pid is not None:
            children = _children_of(pid)
            stop_pid(pid, grace=5.0, group=False)
            for child in children:
                stop_pid(child, grace=2.0, group=False)
        self.pid = None
        if remove and self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalSshd:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- helpers for tests and the demo -------------------------------------------------
    def target(self, name: str = "local-sshd", **overrides: object) -> SshTarget:
        """An :class:`~labkeeper.ssh.SshTarget` for this server (strict host keys)."""
        from labkeeper.ssh import SshTarget

        fields: dict[str, object] = {
            "name": name, "host": self.host, "port": self.port, "user": self.user,
            "key": self.user_key_ref, "known_hosts": self.known_hosts_path,
            "connect_timeout": 5.0,
        }
        fields.update(overrides)
        return SshTarget(**fields)  # type: ignore[arg-type]

    def write_known_hosts(self, path: Path, *, hashed: bool = False) -> Path:
        """A known_hosts file at ``path`` that trusts this server's real key."""
        path.write_text(self.known_hosts_line(hashed=hashed) + "\n")
        return path

    def write_wrong_known_hosts(self, path: Path, *, kind: KeyKind = "ed25519",
                                hashed: bool = False) -> Path:
        """A known_hosts file naming this server with a *different* (newly generated)
        host key, as after a reinstall or during a man-in-the-middle attack."""
        from labkeeper.ssh import known_hosts_line

        _, other = generate_key(kind)
        key_type, b64 = other.split()[:2]
        path.write_text(known_hosts_line(self.host_key_name, key_type, b64, hashed=hashed)
                        + "\n")
        return path

    def add_user_key(self, kind: KeyKind = "ed25519", *, authorize: bool = True,
                     name: str | None = None) -> Path:
        """Generate another user key (authorised unless ``authorize=False``); returns
        the private key path (0600)."""
        pem, public = generate_key(kind, comment=f"labkeeper-extra-{kind}")
        path = self.workdir / (name or f"id_{kind}_{os.urandom(4).hex()}")
        write_private_key(path, pem)
        if authorize:
            with self.authorized_keys_path.open("a") as f:
                f.write(public + "\n")
        return path

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)


def _children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (per-connection sshd processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and fields[1] == str(pid):
            found.append(int(entry.name))
    return found
