"""The job commands print their run's table and exit by its outcome."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.main import app


def test_backup_run_of_one_database_prints_its_row_and_exits_zero(lab, prefect_harness):
    res = CliRunner().invoke(app, ["backup", "run", "--lab", str(lab.inventory_path),
                                   "--db", "photos"])
    assert res.exit_code == 0, res.output
    assert "pg_backup" in res.output and "photos" in res.output and "ok" in res.output


def test_paths_run_backs_up_the_lab_tree_and_exits_zero(lab, prefect_harness):
    from labkeeper import restic

    def series() -> set[str]:
        return {s.id for s in restic.find_snapshots(
            lab.repo, tags=["kind:paths", "paths:labhost/demo-files"], host="local-lab")}

    before = series()
    res = CliRunner().invoke(app, ["paths", "run", "--lab", str(lab.inventory_path)])
    assert res.exit_code == 0, res.output
    assert "path_backup" in res.output
    assert len(series() - before) == 1


def test_backup_run_of_an_unknown_database_fails_with_exit_one(lab, prefect_harness):
    res = CliRunner().invoke(app, ["backup", "run", "--lab", str(lab.inventory_path),
                                   "--db", "nosuchdb"])
    assert res.exit_code == 1
    assert "nosuchdb" in res.output
