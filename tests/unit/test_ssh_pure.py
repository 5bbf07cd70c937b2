"""Pure parts of the SSH runner: quoting, env blocks, fingerprints, known_hosts, keys."""

from __future__ import annotations

import base64
import hashlib
import shlex
import stat
from pathlib import Path

import paramiko
import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkeeper.errors import ConfigError, SSHAuthError
from labkeeper.locallab.sshd import generate_key, sshd_config
from labkeeper.ssh import (
    SshTarget,
    append_known_host,
    deadline_argv,
    env_argv,
    env_block,
    fingerprint,
    host_key_name,
    known_hosts_line,
    load_private_key,
    remote_command,
)

NASTY = "$(touch /tmp/pwned); rm -rf x 'a\"b"


def test_remote_command_quotes_metacharacters_into_one_word():
    cmd = remote_command(["printf", "%s", NASTY])
    assert shlex.split(cmd) == ["printf", "%s", NASTY]
    assert "$(touch" not in cmd.replace(shlex.quote(NASTY), "")


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\x00"), min_size=0),
                min_size=1, max_size=6))
def test_remote_command_round_trips_any_argv(argv):
    assert shlex.split(remote_command(argv)) == argv


def test_remote_command_refuses_empty_and_nul_and_non_strings():
    with pytest.raises(ValueError):
        remote_command([])
    with pytest.raises(ValueError):
        remote_command(["echo", "a\x00b"])
    with pytest.raises(TypeError):
        remote_command(["echo", 3])  # type: ignore[list-item]


def test_env_block_is_name_value_lines_ending_with_an_empty_line():
    assert env_block({"A": "1", "B_2": "x y $(z)"}) == b"A=1\nB_2=x y $(z)\n\n"


@pytest.mark.parametrize("env", [{"BAD-NAME": "x"}, {"A": "two\nlines"}, {"A": "nul\x00"},
                                 {"1A": "x"}])
def test_env_block_refuses_bad_names_and_multiline_values(env):
    with pytest.raises(ValueError):
        env_block(env)


def test_env_argv_keeps_the_command_after_a_fixed_preamble():
    wrapped = env_argv(["psql", "-c", "select 1"])
    assert wrapped[:2] == ("sh", "-c")
    assert wrapped[3:] == ("labkeeper-env", "psql", "-c", "select 1")


def test_deadline_argv_trails_our_deadline_and_kills_after_a_grace():
    assert deadline_argv(["sleep", "9"], 2.5) == (
        "timeout", "-s", "TERM", "-k", "5", "3.5", "sleep", "9")
    assert deadline_argv(["true"], 10)[5] == "11"


def test_host_key_name_brackets_non_default_ports():
    assert host_key_name("10.0.0.5", 22) == "10.0.0.5"
    assert host_key_name("127.0.0.1", 2222) == "[127.0.0.1]:2222"


def test_fingerprint_matches_openssh_format():
    _, public = generate_key("ed25519")
    blob = base64.b64decode(public.split()[1])
    expected = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    fp = fingerprint(blob)
    assert fp == "SHA256:" + expected
    assert len(fp) == len("SHA256:") + 43  # 32 bytes, unpadded base64
    key = paramiko.Ed25519Key(data=blob)
    assert fp == key.fingerprint  # paramiko's own OpenSSH-style fingerprint agrees


def test_known_hosts_line_plain_and_hashed_both_match_in_paramiko():
    _, public = generate_key("ed25519")
    kind, b64 = public.split()[:2]
    plain = known_hosts_line("[127.0.0.1]:2222", kind, b64)
    assert plain == f"[127.0.0.1]:2222 {kind} {b64}"
    hashed = known_hosts_line("[127.0.0.1]:2222", kind, b64, hashed=True)
    assert hashed.startswith("|1|") and "127.0.0.1" not in hashed
    for line in (plain, hashed):
        entry = paramiko.hostkeys.HostKeyEntry.from_line(line)
        keys = paramiko.HostKeys()
        keys._entries.append(entry)
        assert keys.lookup("[127.0.0.1]:2222") is not None
        assert keys.lookup("[127.0.0.1]:2223") is None


def test_known_hosts_line_refuses_whitespace_in_names_and_corrupt_keys():
    with pytest.raises(ValueError):
        known_hosts_line("a b", "ssh-ed25519", "AAAA")
    with pytest.raises(ValueError):
        known_hosts_line("host", "ssh-ed25519", "not base64!")


def test_append_known_host_creates_0600_file_and_starts_on_a_fresh_line(tmp_path: Path):
    path = tmp_path / "sub" / "known_hosts"
    append_known_host(path, "h1 ssh-ed25519 AAAA")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with path.open("a") as f:
        f.write("# a comment without newline")
    append_known_host(path, "h2 ssh-ed25519 BBBB")
    assert path.read_text().splitlines() == [
        "h1 ssh-ed25519 AAAA", "# a comment without newline", "h2 ssh-ed25519 BBBB"]


@pytest.mark.parametrize("kind,cls", [("ed25519", paramiko.Ed25519Key),
                                      ("ecdsa", paramiko.ECDSAKey), ("rsa", paramiko.RSAKey)])
def test_load_private_key_reads_openssh_keys_of_each_type(kind, cls):
    pem, public = generate_key(kind)
    key = load_private_key(pem.decode().rstrip("\n"))  # resolve() strips the newline
    assert isinstance(key, cls)
    assert key.get_base64() == public.split()[1]


def test_load_private_key_reads_legacy_pem_rsa():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption()).decode()
    assert isinstance(load_private_key(pem), paramiko.RSAKey)


def test_load_private_key_refuses_garbage_without_echoing_it():
    secret_looking = "-----BEGIN OPENSSH PRIVATE KEY-----\nhunter2hunter2\n"
    with pytest.raises(SSHAuthError) as info:
        load_private_key(secret_looking)
    assert "hunter2" not in str(info.value)


def test_target_refuses_bad_references_and_ports(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        SshTarget(name="db", host="10.0.0.5", key="/root/.ssh/id_ed25519",
                  known_hosts=tmp_path / "kh", port=70000)
    assert "key:" in str(info.value) and "port:" in str(info.value)


def test_targets_compare_by_value_so_the_pool_can_key_on_them(tmp_path: Path):
    a = SshTarget(name="db", host="10.0.0.5", key="env:KEY", known_hosts=str(tmp_path / "kh"))
    b = SshTarget(name="db", host="10.0.0.5", key="env:KEY", known_hosts=tmp_path / "kh")
    assert a == b and hash(a) == hash(b)
    assert isinstance(a.known_hosts, Path)


def test_sshd_config_is_private_and_key_only(tmp_path: Path):
    cfg = sshd_config(port=2222, host_key=tmp_path / "hk", authorized_keys=tmp_path / "ak",
                      pid_file=tmp_path / "pid")
    lines = cfg.splitlines()
    for expected in ("Port 2222", "ListenAddress 127.0.0.1", "UsePAM no", "StrictModes no",
                     "PasswordAuthentication no", f"AuthorizedKeysFile {tmp_path / 'ak'}",
                     f"PidFile {tmp_path / 'pid'}"):
        assert expected in lines


def test_pinned_fingerprint_accepts_key_lines_and_fingerprints():
    from labkeeper.ssh import pinned_fingerprint

    _, public = generate_key("ed25519", comment="host")
    fp = fingerprint(base64.b64decode(public.split()[1]))
    assert pinned_fingerprint(public) == fp
    assert pinned_fingerprint(fp) == fp
    for bad in ("SHA256:short", "ssh-ed25519", "ssh-ed25519 not-base64!"):
        with pytest.raises(ValueError):
            pinned_fingerprint(bad)


def test_target_from_inventory_spec(tmp_path: Path):
    from labkeeper.inventory import SshTargetSpec

    spec = SshTargetSpec(name="nas", kind="host", address="10.0.0.9", port=2222, user="backup",
                         key="file:/run/secrets/nas-key", known_hosts=tmp_path / "kh",
                         trust_on_first_use=True, host_key=None, connect_timeout=7,
                         command_timeout=600)
    target = SshTarget.from_spec(spec)
    assert (target.host, target.port, target.user, target.key) == (
        "10.0.0.9", 2222, "backup", "file:/run/secrets/nas-key")
    assert target.trust_on_first_use and target.connect_timeout == 7.0
    with pytest.raises(ConfigError):
        SshTarget.from_spec(spec.model_copy(update={"key": None}))
