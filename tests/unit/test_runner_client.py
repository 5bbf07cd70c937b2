"""The thin client of the warm runner: where it looks, what it compares, whom it trusts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cli import runner_client as rc
from labkeeper import local_server as ls

ROOT = Path(__file__).resolve().parents[2]


def test_the_client_finds_the_runner_socket_where_the_local_server_starts_it():
    for env in ({"HOME": "/home/u"}, {"HOME": "/home/u", "XDG_STATE_HOME": "/var/st"},
                {"LABKEEPER_PREFECT_HOME": "/srv/p", "XDG_STATE_HOME": "/x"}, {}):
        assert rc.socket_path(env) == str(ls.runner_socket(ls.local_server(env))), env


def test_a_peer_of_another_uid_is_refused_and_our_own_is_not():
    assert rc.peer_refusal(1000, 1000) is None
    assert "uid 0" in (rc.peer_refusal(0, 1000) or "")


def test_the_code_stamp_changes_when_a_package_source_changes(tmp_path):
    from labkeeper.code_stamp import PACKAGES

    for pkg in PACKAGES:
        (tmp_path / pkg).mkdir()
    src = tmp_path / "labkeeper" / "x.py"
    src.write_text("A = 1\n")
    before = rc.code_stamp(str(tmp_path))
    assert rc.code_stamp(str(tmp_path)) == before
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert rc.code_stamp(str(tmp_path)) != before


def test_a_signal_status_becomes_a_shell_exit_code():
    assert rc.exit_code(0) == 0 and rc.exit_code(3) == 3 and rc.exit_code(-2) == 130


def test_without_a_runner_or_with_no_runner_set_the_command_is_left_to_this_process(tmp_path):
    assert rc.run(["labkeeper", "backup", "run"], {"LABKEEPER_PREFECT_HOME": str(tmp_path)}) \
        is None
    assert rc.run(["labkeeper", "backup", "run"], {"LABKEEPER_NO_RUNNER": "1"}) is None


def test_the_client_path_imports_neither_prefect_typer_rich_pydantic_nor_logging():
    code = ("import sys, cli.main, cli.runner_client; "
            "print(','.join(m for m in ('prefect', 'typer', 'rich', 'pydantic', "
            "'labkeeper.local_server', 'logging') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120).stdout.strip()
    assert out == "", f"imported before the runner is tried: {out}"
