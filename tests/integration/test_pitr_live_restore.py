"""One database back on the live server as of a moment, through the runbook
pitr-restore-database (PostgreSQL 15, restic, moto S3, a Prefect server): a writer
commits timestamped rows; the runbook recovers the server to a time between two
commits in a scratch cluster, copies the database onto the live server beside the
original, and swaps it in only after approval; a rejection drops the copy. The
other database of the server and the scratch cluster are checked too."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.main import app as cli_app
from flows.runbook import runbook_flow
from labkeeper.inventory import load_inventory
from labkeeper.pitr import basebackup, wal
from tests.integration.pitr_support import DB, PitrLab, Receiver, Writer, start_pitr_lab
from tests.integration.test_runbook_flow import _paused_run, _run_in_thread

pytestmark = pytest.mark.integration

OTHER = "otherdb"


@dataclasses.dataclass
class Scene:
    plab: PitrLab
    lab_file: Path
    to: str
    before: list[int]
    """Ids committed before ``to``."""
    all_ids: list[int]
    other_rows: int

    def ids(self, db: str) -> list[int]:
        out = self.plab.pg.psql_super("SELECT id FROM ticks ORDER BY id;", db=db)
        return [int(x) for x in out.split()]

    def databases(self, like: str) -> list[str]:
        out = self.plab.pg.psql_super("SELECT datname FROM pg_database WHERE datname LIKE "
                                      f"'{like}' ORDER BY 1;")
        return out.split()

    def other(self) -> int:
        return int(self.plab.pg.psql_super("SELECT count(*) FROM t;", db=OTHER).strip())

    def restores_left(self) -> list[Path]:
        base = self.plab.target().spool.parent / "restores"
        return sorted(base.iterdir()) if base.exists() else []


def build_scene(workdir: Path) -> tuple[Scene, Receiver]:
    """A base backup, rows committed after it (the target lies between two of them),
    more rows after the target (in both databases), WAL shipped past all of them."""
    plab = start_pitr_lab(workdir)
    data = yaml.safe_load((workdir / "lab.yaml").read_text())
    data["settings"]["tuning"] = {"approval_poll": 1}
    (workdir / "lab.yaml").write_text(yaml.safe_dump(data))
    plab.inv = load_inventory(workdir / "lab.yaml")
    plab.pg.psql_super(f"CREATE DATABASE {OTHER} OWNER labkeeper;")
    plab.pg.psql_super("SET ROLE labkeeper; CREATE TABLE t (id int);", db=OTHER)
    receiver = Receiver(plab).start()
    writer = Writer(plab).start()
    try:
        writer.wait_rows(3)
        basebackup.run_base_backup(plab.target())
        writer.wait_rows(8)
    finally:
        writer.stop()
    rows = list(writer.rows)
    plab.pg.psql_super("INSERT INTO t SELECT generate_series(1, 5);", db=OTHER)  # after `to`
    wal.ship(plab.target())
    k = len(rows) - 4
    _id_next, at_next = rows[k + 1]
    to = (at_next - timedelta(microseconds=1)).isoformat()
    scene = Scene(plab, workdir / "lab.yaml", to, [i for i, _ in rows[:k + 1]],
                  [i for i, _ in rows], 5)
    return scene, receiver


@pytest.fixture(scope="module")
def scene(prefect_harness: None) -> Iterator[Scene]:
    workdir = Path(tempfile.mkdtemp(prefix="labkeeper-pitr-live-"))  # postgres must reach it
    sc: Scene | None = None
    receiver: Receiver | None = None
    try:
        sc, receiver = build_scene(workdir)
        yield sc
    finally:
        if receiver is not None:
            receiver.stop()
        if sc is not None:
            sc.plab.lab.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _params(sc: Scene) -> dict[str, Any]:
    return {"server": "pg1", "database": DB, "to": sc.to}


def test_dry_run_shows_the_plan_and_changes_nothing(scene: Scene) -> None:
    before = scene.databases("%")
    state = runbook_flow(name="pitr-restore-database", params=_params(scene), dry_run=True,
                         lab=str(scene.lab_file), return_state=True)
    assert state.is_completed(), state.message
    rows = {r["step"]: r for r in state.result()}
    assert {r["status"] for r in rows.values()} == {"planned"}, rows
    plan = rows["copy"]["detail"]
    assert plan.startswith(f"recover pg1 to {scene.to}") and "base backup" in plan, plan
    assert f"as {DB}_pitr_" in plan and "remove the scratch cluster" in plan, plan
    assert scene.databases("%") == before


def test_approved_runbook_puts_the_rows_before_the_target_in_place_and_keeps_the_old(
        scene: Scene) -> None:
    assert scene.ids(DB) == scene.all_ids
    started = time.time()
    t, box = _run_in_thread(name="pitr-restore-database", params=_params(scene),
                            lab=str(scene.lab_file))
    run_id = _paused_run(started, timeout=300)
    # waiting for approval: the copy is there, the live database untouched
    [copy] = scene.databases(f"{DB}\\_pitr\\_%")
    assert scene.ids(copy) == scene.before
    assert scene.ids(DB) == scene.all_ids
    assert scene.restores_left() == [], "the scratch cluster was not removed"
    res = CliRunner().invoke(cli_app, ["runbook", "approve", run_id])
    assert res.exit_code == 0, res.output
    t.join(300)
    state = box["state"]
    assert state.is_completed(), state.message
    statuses = {r["step"]: r["status"] for r in state.result()}
    assert statuses == {"copy": "ok", "check": "ok", "reached": "ok", "approve-swap": "ok",
                        "swap": "ok", "answers": "ok", "done": "ok"}, statuses
    assert scene.ids(DB) == scene.before  # exactly the rows committed before the target
    [aside] = scene.databases(f"{DB}\\_before\\_pitr\\_%")
    assert aside == copy.replace("_pitr_", "_before_pitr_")
    assert scene.ids(aside) == scene.all_ids  # the old one, kept
    assert not scene.databases(f"{DB}\\_pitr\\_%")
    assert scene.other() == scene.other_rows  # the other database: untouched
    reached = next(r for r in state.result() if r["step"] == "reached")["detail"]
    assert "recovery stopping before commit" in reached, reached  # what it reached
    assert (f"public.ticks: {len(scene.before)} in the copy, {len(scene.all_ids)} now"
            in reached), reached  # the check's row counts, shown before the approval


def test_a_rejected_approval_leaves_the_live_database_as_it_was_and_drops_the_copy(
        scene: Scene) -> None:
    live = scene.ids(DB)
    asides = scene.databases(f"{DB}\\_before\\_pitr\\_%")
    started = time.time()
    t, box = _run_in_thread(name="pitr-restore-database", params=_params(scene),
                            lab=str(scene.lab_file))
    run_id = _paused_run(started, timeout=300)
    assert len(scene.databases(f"{DB}\\_pitr\\_%")) == 1
    res = CliRunner().invoke(cli_app, ["runbook", "approve", run_id, "--reject"])
    assert res.exit_code == 0, res.output
    t.join(300)
    state = box["state"]
    assert state.is_cancelled(), state
    assert not scene.databases(f"{DB}\\_pitr\\_%"), "the copy was not dropped"
    assert scene.ids(DB) == live
    assert scene.databases(f"{DB}\\_before\\_pitr\\_%") == asides
    assert scene.restores_left() == []


def test_the_runbooks_run_form_offers_the_labs_pitr_servers(scene: Scene) -> None:
    from tests.unit.test_run_forms import _enum, _forms

    props = _forms(scene.plab.inv)["pitr-restore-database"]["properties"]
    assert _enum(props["server"]) == ["pg1"]
    assert _enum(props["database"]) == [d.name for d in scene.plab.inv.databases]


def test_swap_and_drop_accept_only_a_copy_of_the_database_they_are_given() -> None:
    from labkeeper.errors import ConfigError
    from labkeeper.pitr import copy as pitr_copy

    assert pitr_copy.copy_name("App-DB", "202612051404") == "app_db_pitr_202612051404"
    assert pitr_copy.aside_name("app_db", "app_db_pitr_202612051404") == \
        "app_db_before_pitr_202612051404"
    for other in ("appdb", "other_pitr_202612051404", "app_db_pitr_2026120514",
                  'app_db_pitr_202612051404"; DROP DATABASE x; --',
                  "app_db_restored_20261205140400"):
        with pytest.raises(ConfigError):
            pitr_copy.stamp_of("app_db", other)
    with pytest.raises(ValueError):
        pitr_copy.create_sql("appdb")
    assert pitr_copy.create_sql("a_pitr_202612051404") == \
        'CREATE DATABASE "a_pitr_202612051404" TEMPLATE template0;'
