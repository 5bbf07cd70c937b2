"""A path set with ``sudo: restic`` is drilled within its documented sudoers (restic and
sha256sum, no shell under sudo)."""

from __future__ import annotations

import hashlib
import subprocess

from labkeeper.drill import paths as drill_paths


def _fake_sudo(tmp_path):
    """A ``sudo`` that logs its argv and runs the command after ``--``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sudo.log"
    sudo = bindir / "sudo"
    sudo.write_text('#!/bin/sh\necho "$*" >> "$SUDO_LOG"\n'
                    '[ "$1" = -n ] && [ "$2" = -- ] || exit 1\nshift 2\nexec "$@"\n')
    sudo.chmod(0o755)
    return bindir, log


def _run(argv, bindir, log):
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SUDO_LOG": str(log)}
    res = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    return drill_paths.parse_source(res.returncode, res.stdout, res.stderr)


def test_sudo_restic_runs_no_shell_under_sudo():
    argv = drill_paths.source_hash_argv("/srv/data/a file", sudo="restic")
    assert argv[:2] == ("sh", "-c") and argv[3:] == ("labkeeper-drill", "/srv/data/a file")
    assert 'sudo -n -- sha256sum -- "$1"' in argv[2]
    assert drill_paths.source_hash_argv("/srv/x", sudo=True)[:5] == (
        "sudo", "-n", "--", "sh", "-c")


def test_sudo_restic_hashes_the_file_with_sudo_sha256sum_only(tmp_path):
    bindir, log = _fake_sudo(tmp_path)
    target = tmp_path / "data" / "it's a $file"
    target.parent.mkdir()
    target.write_bytes(b"drill me\n")
    found = _run(drill_paths.source_hash_argv(str(target), sudo="restic"), bindir, log)
    assert found.state == "ok"
    assert found.sha256 == hashlib.sha256(b"drill me\n").hexdigest()
    assert found.size == 9 and not found.changed_during
    assert log.read_text().splitlines() == [f"-n -- sha256sum -- {target}"]


def test_sudo_restic_missing_file_is_gone_only_in_a_searchable_directory(tmp_path):
    bindir, log = _fake_sudo(tmp_path)
    (tmp_path / "data").mkdir()
    gone = _run(drill_paths.source_hash_argv(str(tmp_path / "data" / "was-here"),
                                             sudo="restic"), bindir, log)
    assert gone.state == "gone"
    unreachable = _run(drill_paths.source_hash_argv(str(tmp_path / "nodir" / "f"),
                                                    sudo="restic"), bindir, log)
    assert unreachable.state == "error"
    assert not log.exists()
