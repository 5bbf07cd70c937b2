"""pg_dump's version is read once per binary file (the manifest names it on every
backup), and again when the binary changes."""

from __future__ import annotations

import os
from pathlib import Path

from labkeeper import postgres


def _fake_pg_dump(bindir: Path, calls: Path, version: str) -> Path:
    tool = bindir / "pg_dump"
    tool.write_text(f'#!/bin/sh\necho run >> {calls}\necho "pg_dump (PostgreSQL) {version}"\n')
    tool.chmod(0o755)
    return tool


def test_pg_dump_version_runs_once_per_binary_and_again_when_it_changes(tmp_path):
    calls = tmp_path / "calls"
    tool = _fake_pg_dump(tmp_path, calls, "15.8")
    conn = postgres.Conn(host="127.0.0.1", port=5432, dbname="d", user="u",
                         client=postgres.Client(bindir=str(tmp_path)))
    assert postgres.pg_dump_version(conn) == "15.8"
    assert postgres.pg_dump_version(conn) == "15.8"
    assert calls.read_text().count("run") == 1
    _fake_pg_dump(tmp_path, calls, "15.9")  # upgraded in place
    st = tool.stat()
    os.utime(tool, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert postgres.pg_dump_version(conn) == "15.9"
    assert calls.read_text().count("run") == 2


def test_pg_dump_version_of_a_client_run_elsewhere_is_asked_each_time(tmp_path):
    calls = tmp_path / "calls"
    _fake_pg_dump(tmp_path, calls, "17.2")
    # a prefix runs the tool elsewhere (docker exec, the SSH bridge): here `env`
    conn = postgres.Conn(host="127.0.0.1", port=5432, dbname="d", user="u",
                         client=postgres.Client(prefix=("env",), bindir=str(tmp_path)))
    assert postgres.pg_dump_version(conn) == postgres.pg_dump_version(conn) == "17.2"
    assert calls.read_text().count("run") == 2
