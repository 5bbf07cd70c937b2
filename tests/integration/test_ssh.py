"""The SSH runner against a real OpenSSH sshd on a loopback port."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import stat
import threading
import time
import uuid
from pathlib import Path

import pytest

from labkeeper.errors import (
    CommandError,
    CommandTimeout,
    HostKeyError,
    SSHAuthError,
    SSHConnectError,
    is_transient,
)
from labkeeper.locallab.ports import free_port
from labkeeper.locallab.sshd import LocalSshd, generate_key
from labkeeper.process import CommandResult, ExitCode, ExitCodeTable
from labkeeper.secrets import MASK, register
from labkeeper.ssh import SshClient, SshPool, connect
from tests.fixtures.waiting import wait_until

pytestmark = pytest.mark.integration

NASTY = "$(touch /tmp/pwned-{tag}); rm -rf x 'a\"b; `touch /tmp/pwned-{tag}` && echo *"


def _cmdlines_containing(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in raw:
                found.append(raw.replace(b"\0", b" ").decode(errors="replace"))
    return found


# --------------------------------------------------------------------------- commands


def test_command_success_returns_stdout_and_exit_zero(ssh_client: SshClient):
    result = ssh_client.run(["echo", "hello", "world"], timeout=10)
    assert isinstance(result, CommandResult)
    assert result.returncode == 0 and result.ok
    assert result.stdout == "hello world\n"
    assert result.host == "local-sshd"
    assert result.argv == ("echo", "hello", "world")


def test_non_zero_exit_raises_command_error_with_code_and_stderr_tail(ssh_client: SshClient):
    with pytest.raises(CommandError) as info:
        ssh_client.run(["sh", "-c", "echo first >&2; echo 'disk full' >&2; exit 3"],
                       timeout=10)
    err = info.value
    assert err.returncode == 3
    assert err.stderr_tail.splitlines()[-1] == "disk full"
    assert "local-sshd" in str(err) and "disk full" in str(err)
    assert not err.transient


def test_non_zero_exit_with_check_false_returns_the_result(ssh_client: SshClient):
    result = ssh_client.run(["sh", "-c", "echo out; echo err >&2; exit 4"], timeout=10,
                            check=False)
    assert (result.returncode, result.ok) == (4, False)
    assert result.stdout == "out\n" and result.stderr == "err\n"


def test_exit_code_table_decides_warning_and_transient(ssh_client: SshClient):
    table = ExitCodeTable("tool", {0: ExitCode("ok", "ok"), 1: ExitCode("partial", "warning"),
                                   75: ExitCode("locked", "transient")})
    assert ssh_client.run(["sh", "-c", "exit 1"], timeout=10, codes=table).warning
    with pytest.raises(CommandError) as info:
        ssh_client.run(["sh", "-c", "exit 75"], timeout=10, codes=table)
    assert info.value.transient and info.value.meaning == "locked"


def test_command_timeout_raises_quickly_and_the_remote_command_dies(ssh_client: SshClient):
    # A unique sleep duration finds the remote process in /proc (sshd is local).
    marker = f"{time.time_ns() % 10**7}.{uuid.uuid4().int % 1000:03d}1"
    # Watched from before the run: on a loaded machine the remote sleep may start only
    # around our deadline (or be stopped before we look), so it is not looked for once.
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.extend(c for c in _cmdlines_containing(marker) if c.startswith("sleep "))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        started = time.monotonic()
        with pytest.raises(CommandTimeout) as info:
            ssh_client.run(["sleep", marker], timeout=0.5)
        assert time.monotonic() - started < 1.5
        assert info.value.transient and info.value.timeout == 0.5
        wait_until(lambda: seen, timeout=30, what="the remote sleep to run")
    finally:
        stop.set()
        watcher.join(10)
    # it would sleep for days: the remote deadline (1 s after ours) stops it
    wait_until(lambda: _cmdlines_containing(marker) == [], timeout=30,
               what="the remote sleep to end")
    # The connection is still usable afterwards.
    assert ssh_client.run(["true"], timeout=10).ok


def test_large_streamed_output_arrives_complete_and_every_line_is_seen(
        ssh_client: SshClient):
    # 1,000,000 lines of 20 bytes = 20 MB; each line must arrive once, in order.
    n = 1_000_000
    state = {"count": 0, "bad": 0}

    def on_line(line: str) -> None:
        state["count"] += 1
        if int(line) != state["count"]:
            state["bad"] += 1

    digest = hashlib.sha256()
    result = ssh_client.run(["seq", "-f", "%019.0f", "1", str(n)], timeout=60,
                            on_stdout_line=on_line, stdout_writer=digest.update)
    assert result.ok
    assert state == {"count": n, "bad": 0}
    expected = hashlib.sha256(
        "".join(f"{i:019d}\n" for i in range(1, n + 1)).encode()).hexdigest()
    assert digest.hexdigest() == expected


def test_stderr_lines_stream_to_their_callback(ssh_client: SshClient):
    seen: list[str] = []
    ssh_client.run(["sh", "-c", "for i in 1 2 3; do echo e$i >&2; done"], timeout=10,
                   on_stderr_line=seen.append)
    assert seen == ["e1", "e2", "e3"]


def test_shell_metacharacters_pass_through_as_one_argument_and_execute_nothing(
        ssh_client: SshClient):
    tag = uuid.uuid4().hex[:8]
    value = NASTY.format(tag=tag)
    result = ssh_client.run(["printf", "%s", value], timeout=10)
    assert result.stdout == value
    count = ssh_client.run(["sh", "-c", 'echo $#', "argc", value, "second arg"], timeout=10)
    assert count.stdout == "2\n"
    assert not Path(f"/tmp/pwned-{tag}").exists()


def test_input_reaches_stdin_and_large_input_does_not_deadlock(ssh_client: SshClient):
    assert ssh_client.run(["cat"], timeout=10, input="via stdin\n").stdout == "via stdin\n"
    blob = os.urandom(3 * 1024 * 1024)
    result = ssh_client.run(["sha256sum"], timeout=30, input=blob)
    assert result.stdout.split()[0] == hashlib.sha256(blob).hexdigest()


def test_env_travels_on_stdin_not_on_the_command_line(ssh_client: SshClient):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    register(secret)
    seen_cmdlines: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen_cmdlines.extend(_cmdlines_containing("labkeeper-env"))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = ssh_client.run(
            ["sh", "-c", 'sleep 0.3; [ "$PGPASSWORD" = "$1" ] && echo same; cat', "sh",
             "placeholder"],
            timeout=10, env={"PGPASSWORD": secret, "ODD": "x $(touch /tmp/no) 'y"},
            input="rest of stdin\n", check=False)
    finally:
        stop.set()
        watcher.join()
    assert seen_cmdlines, "the wrapped command was not observed running"
    assert not any(secret in c for c in seen_cmdlines)
    assert result.stdout == "rest of stdin\n"  # "same" is not printed: $1 is a placeholder
    shown = ssh_client.run(["sh", "-c", 'printf %s "$PGPASSWORD"; printf "|%s" "$ODD"'],
                           timeout=10, env={"PGPASSWORD": secret, "ODD": "x $(id) 'y"})
    # The value arrived intact, and is masked in what labkeeper returns.
    assert shown.stdout == f"{MASK}|x $(id) 'y"


def test_secret_in_stderr_is_masked_in_the_raised_error(ssh_client: SshClient):
    secret = f"pw-{uuid.uuid4().hex}"
    register(secret)
    with pytest.raises(CommandError) as info:
        ssh_client.run(["sh", "-c", 'echo "bad password $1" >&2; exit 2', "sh", secret],
                       timeout=10)
    assert secret not in str(info.value) and secret not in info.value.stderr_tail
    assert secret not in " ".join(info.value.argv)
    assert MASK in info.value.stderr_tail


# --------------------------------------------------------------------------- host keys


def test_wrong_host_key_is_refused(local_sshd: LocalSshd, tmp_path: Path):
    known = local_sshd.write_wrong_known_hosts(tmp_path / "known_hosts")
    with pytest.raises(HostKeyError) as info:
        connect(local_sshd.target(known_hosts=known))
    assert info.value.fingerprint.startswith("SHA256:")
    assert info.value.host == local_sshd.host_key_name
    assert "CHANGED" in str(info.value) and not info.value.transient


def test_changed_host_key_is_refused_even_with_trust_on_first_use(local_sshd: LocalSshd,
                                                                   tmp_path: Path):
    known = local_sshd.write_wrong_known_hosts(tmp_path / "known_hosts")
    before = known.read_text()
    with pytest.raises(HostKeyError):
        connect(local_sshd.target(known_hosts=known, trust_on_first_use=True))
    assert known.read_text() == before


def test_known_key_of_another_type_counts_as_changed(local_sshd: LocalSshd, tmp_path: Path):
    known = local_sshd.write_wrong_known_hosts(tmp_path / "known_hosts", kind="ecdsa")
    with pytest.raises(HostKeyError):
        connect(local_sshd.target(known_hosts=known, trust_on_first_use=True))


def test_unknown_host_is_refused_without_trust_on_first_use(local_sshd: LocalSshd,
                                                            tmp_path: Path):
    known = tmp_path / "known_hosts"
    known.write_text("# nobody here yet\n")
    with pytest.raises(HostKeyError) as info:
        connect(local_sshd.target(known_hosts=known))
    assert "not in" in str(info.value)
    assert info.value.fingerprint == local_sshd_fingerprint(local_sshd)
    with pytest.raises(HostKeyError):  # a missing file is no different
        connect(local_sshd.target(known_hosts=tmp_path / "absent"))
    assert known.read_text() == "# nobody here yet\n"


def test_unknown_host_is_accepted_with_trust_on_first_use_and_recorded(local_sshd: LocalSshd,
                                                                       tmp_path: Path):
    known = tmp_path / "ssh" / "known_hosts"
    with connect(local_sshd.target(known_hosts=known, trust_on_first_use=True)) as client:
        assert client.run(["true"], timeout=10).ok
    assert known.read_text() == local_sshd.known_hosts_line() + "\n"
    assert stat.S_IMODE(known.stat().st_mode) == 0o600
    # Recorded: a strict connection now succeeds with that file.
    with connect(local_sshd.target(known_hosts=known)) as client:
        assert client.run(["true"], timeout=10).ok


def test_hashed_known_hosts_entry_is_honoured(local_sshd: LocalSshd, tmp_path: Path):
    known = local_sshd.write_known_hosts(tmp_path / "known_hosts", hashed=True)
    assert known.read_text().startswith("|1|")
    with connect(local_sshd.target(known_hosts=known)) as client:
        assert client.run(["true"], timeout=10).ok
    wrong = local_sshd.write_wrong_known_hosts(tmp_path / "wrong", hashed=True)
    with pytest.raises(HostKeyError):
        connect(local_sshd.target(known_hosts=wrong))


def test_pinned_host_key_wins_over_known_hosts(local_sshd: LocalSshd, tmp_path: Path):
    wrong = local_sshd.write_wrong_known_hosts(tmp_path / "wrong")
    for pin in (local_sshd.host_public_key, local_sshd_fingerprint(local_sshd)):
        with connect(local_sshd.target(known_hosts=wrong, host_key=pin)) as client:
            assert client.run(["true"], timeout=10).ok
    _, other_key = generate_key("ed25519")
    with pytest.raises(HostKeyError) as info:
        connect(local_sshd.target(host_key=other_key, trust_on_first_use=True))
    assert "pins" in str(info.value)
    assert local_sshd.known_hosts_path.read_text() == local_sshd.known_hosts_line() + "\n"


def local_sshd_fingerprint(sshd: LocalSshd) -> str:
    import base64

    from labkeeper.ssh import fingerprint

    return fingerprint(base64.b64decode(sshd.host_public_key.split()[1]))


# --------------------------------------------------------------------------- auth, connect


def test_unauthorised_key_is_an_auth_error(local_sshd: LocalSshd):
    key = local_sshd.add_user_key("ed25519", authorize=False)
    with pytest.raises(SSHAuthError) as info:
        connect(local_sshd.target(key=f"file:{key}"))
    assert not is_transient(info.value)


@pytest.mark.parametrize("kind", ["ecdsa", "rsa"])
def test_ecdsa_and_rsa_user_keys_log_in(local_sshd: LocalSshd, kind):
    key = local_sshd.add_user_key(kind)
    with connect(local_sshd.target(key=f"file:{key}")) as client:
        assert client.run(["true"], timeout=10).ok


def test_key_from_an_environment_reference_logs_in(local_sshd: LocalSshd,
                                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LK_TEST_SSH_KEY", local_sshd.user_key_path.read_text())
    with connect(local_sshd.target(key="env:LK_TEST_SSH_KEY")) as client:
        assert client.run(["true"], timeout=10).ok


def test_connection_refused_on_a_closed_port_is_transient(local_sshd: LocalSshd):
    port = free_port()
    started = time.monotonic()
    with pytest.raises(SSHConnectError) as info:
        connect(local_sshd.target(port=port))
    assert is_transient(info.value)
    assert time.monotonic() - started < 2


def test_silent_server_times_out_as_a_transient_connect_error(local_sshd: LocalSshd):
    with socket.socket() as server:  # accepts TCP but never says the SSH banner
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(SSHConnectError) as info:
            connect(local_sshd.target(port=port, connect_timeout=0.5))
        assert time.monotonic() - started < 5
    assert info.value.transient


# --------------------------------------------------------------------------- SFTP


def test_sftp_round_trip_of_a_few_megabytes_keeps_bytes_and_mode_0600(
        ssh_client: SshClient, tmp_path: Path):
    blob = os.urandom(4 * 1024 * 1024 + 123)
    remote = str(tmp_path / "remote" / "blob.bin")
    (tmp_path / "remote").mkdir()
    assert ssh_client.put_stream(io.BytesIO(blob), remote) == len(blob)
    st = ssh_client.stat(remote)
    assert st.mode == 0o600 and st.size == len(blob) and st.is_file
    out = io.BytesIO()
    assert ssh_client.get_stream(remote, out) == len(blob)
    assert out.getvalue() == blob
    # Only the file remains: the temporary directory is gone.
    assert os.listdir(tmp_path / "remote") == ["blob.bin"]


def test_put_stream_accepts_an_iterable_of_chunks_and_replaces_atomically(
        ssh_client: SshClient, tmp_path: Path):
    remote = tmp_path / "config.env"
    remote.write_text("old\n")
    os.chmod(remote, 0o644)
    n = ssh_client.put_stream((b"line %d\n" % i for i in range(1000)), str(remote),
                              mode=0o640)
    assert n == remote.stat().st_size
    assert stat.S_IMODE(remote.stat().st_mode) == 0o640
    assert remote.read_text().splitlines()[-1] == "line 999"


def test_put_text_and_read_text_round_trip(ssh_client: SshClient, tmp_path: Path):
    remote = str(tmp_path / "note.txt")
    ssh_client.put_text("grüße\nzweite Zeile\n", remote)
    assert ssh_client.read_text(remote) == "grüße\nzweite Zeile\n"
    assert stat.S_IMODE(os.stat(remote).st_mode) == 0o600


def test_failed_upload_leaves_the_old_file_and_no_temporary(ssh_client: SshClient,
                                                             tmp_path: Path):
    remote = tmp_path / "keep.txt"
    remote.write_text("previous\n")

    def chunks():
        yield b"partial"
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        ssh_client.put_stream(chunks(), str(remote))
    assert remote.read_text() == "previous\n"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_stat_of_a_missing_path_raises_file_not_found(ssh_client: SshClient,
                                                      tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ssh_client.stat(str(tmp_path / "nope"))


# --------------------------------------------------------------------------- pool


def test_pool_reuses_one_connection_per_target_and_closes_all(local_sshd: LocalSshd,
                                                              tmp_path: Path):
    other_known = local_sshd.write_known_hosts(tmp_path / "kh2")
    t1 = local_sshd.target()
    t2 = local_sshd.target(name="second", known_hosts=other_known)
    with SshPool() as pool:
        a = pool.get(t1)
        assert pool.get(local_sshd.target()) is a  # equal target, same connection
        b = pool.get(t2)
        assert b is not a
        local_ports = {c._client.get_transport().sock.getsockname()[1] for c in (a, b)}
        assert len(local_ports) == 2
        results = []
        threads = [threading.Thread(target=lambda: results.append(
            pool.get(t1).run(["echo", "x"], timeout=10).stdout)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == ["x\n"] * 4 and pool.connects == 2
        a.close()  # a dropped connection is replaced on the next get
        c = pool.get(t1)
        assert c is not a and c.run(["true"], timeout=10).ok
        assert pool.connects == 3
    assert not b.is_active and not c.is_active


def test_local_sshd_stops_by_pid(tmp_path: Path):
    sshd = LocalSshd(workdir=tmp_path / "sshd").start()
    pid = sshd.pid
    assert pid is not None and sshd.running()
    with connect(sshd.target()) as client:
        assert client.run(["true"], timeout=10).ok
    sshd.stop()
    assert not _pid_alive(pid)
    with pytest.raises(SSHConnectError):
        connect(sshd.target())
    shutil.rmtree(tmp_path / "sshd", ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
