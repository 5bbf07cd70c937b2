"""The command line imports a sub-command's module only when that command is named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("cli.runbook", "cli.pitr", "cli.init",
         "labkeeper.pvesim.cli", "prefect")


def test_importing_the_command_line_imports_no_sub_command_module_nor_prefect():
    code = ("import sys; import cli.main; "
            f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120).stdout.strip()
    assert out == "", f"imported at start-up: {out}"


def test_lazily_mounted_commands_still_run_and_show_in_help():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    for name in ("runbook", "pvesim", "init", "proxmox", "wal", "basebackup", "restore",
                 "pitr", "server"):
        assert name in res.output, name
    res = CliRunner().invoke(app, ["runbook", "list", "--help"])
    assert res.exit_code == 0 and "Usage" in res.output
