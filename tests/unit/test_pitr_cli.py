"""The PITR commands are mounted and refuse what they cannot do before touching anything."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from cli.main import app
from tests.unit.test_pitr_pure import INV


def _lab(tmp_path: Path) -> str:
    path = tmp_path / "lab.yaml"
    path.write_text(INV)
    return str(path)


def test_restore_pitr_onto_a_server_that_is_no_drill_server_is_refused_with_exit_2(
        tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["restore", "pitr", "pg1", "--to", "latest", "--on", "nas",
                                   "--lab", _lab(tmp_path)])
    assert res.exit_code == 2
    assert "no drill server 'nas'" in res.output


def test_wal_ship_of_an_unknown_server_names_the_known_ones(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["wal", "ship", "nosuch", "--lab", _lab(tmp_path)])
    assert res.exit_code == 2
    assert "no pitr server named 'nosuch'" in res.output and "pg1" in res.output


def test_every_pitr_command_is_mounted() -> None:
    for group, cmd in (("wal", "receive"), ("wal", "ship"), ("wal", "status"),
                       ("basebackup", "run"), ("restore", "pitr"), ("pitr", "drill"),
                       ("pitr", "retention")):
        res = CliRunner().invoke(app, [group, cmd, "--help"])
        assert res.exit_code == 0, (group, cmd, res.output)
