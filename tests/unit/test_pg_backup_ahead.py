"""A backup's restic started ahead of its run (labkeeper.pg_backup.ahead): which
databases get one, who takes it, what is stopped; and where the command line and a
served run start it. restic itself is a fake here (tests/integration has the real one)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from labkeeper.inventory import Inventory, load_inventory
from labkeeper.pending import PendingAttempt
from labkeeper.pg_backup import ahead, database
from labkeeper.pg_backup.cleanup import pending_store
from labkeeper.pg_backup.naming import series_tags

EXAMPLE = Path(__file__).resolve().parents[2] / "lab.example.yaml"


class FakeEarly:
    def __init__(self, repo: Any, *, filename: str, host: str, tags: list[str],
                 compression: str, expires: float) -> None:
        self.repo, self.filename, self.host, self.tags = repo, filename, host, tags
        self.compression, self.expires = compression, expires
        self.stopped: list[str] = []
        self.waiting = True

    def stop(self, why: str = "") -> None:
        if self.waiting:
            self.stopped.append(why)
            self.waiting = False


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeEarly]]:
    made: list[FakeEarly] = []

    def start(repo: Any, **kw: Any) -> FakeEarly:
        made.append(FakeEarly(repo, **kw))
        return made[-1]

    monkeypatch.setattr(ahead.restic, "start_backup_early", start)
    monkeypatch.setattr(ahead, "_started", {})
    yield made


def _inventory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *,
               password: str | None = None) -> Inventory:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["settings"].update(state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "c"))
    secret = tmp_path / "restic-password"
    secret.write_text("a-restic-password\n")
    data["repositories"][0]["password"] = password or f"file:{secret}"
    monkeypatch.setenv("B2_KEY_ID", "key-id-for-test")
    monkeypatch.setenv("B2_APP_KEY", "app-key-for-test")
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_inventory(path)


def test_each_database_named_gets_the_restic_its_backup_would_start(
        tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    out = ahead.start_ahead(inv, ["immich", "nextcloud"])
    assert [a.database for a in out] == ["immich", "nextcloud"]
    first = started[0]
    assert first.filename == "immich.sql" and first.host == inv.lab.name
    assert first.tags == [*series_tags(inv.database_server(inv.database("immich")), "immich"),
                          f"backup:{out[0].backup_id}"]
    assert first.expires == ahead.AHEAD_EXPIRES
    assert first.repo.password.get_secret_value() == "a-restic-password"


def test_a_database_with_earlier_attempts_to_sweep_gets_none(tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    _pending(inv, "immich")
    out = ahead.start_ahead(inv, ["immich", "nextcloud"])
    assert [a.database for a in out] == ["nextcloud"]


def test_a_repository_whose_secret_is_a_prefect_block_gets_none(tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch, password="prefect-block:restic-password")
    assert ahead.start_ahead(inv, ["immich"]) == [] and started == []


def test_a_start_that_fails_is_skipped_and_the_others_still_start(
        tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    monkeypatch.delenv("B2_APP_KEY")  # the secret cannot be resolved now
    assert ahead.start_ahead(inv, ["immich"]) == [] and started == []


def test_a_restic_started_ahead_is_taken_once_and_what_was_not_taken_is_stopped(
        tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    with ahead.started_ahead(inv, ["immich", "nextcloud"]) as out:
        assert len(out) == 2
        taken = ahead.take(inv, "immich")
        assert taken is out[0] and ahead.take(inv, "immich") is None
        started[0].waiting = False  # its backup's pipeline took it over
    assert started[0].stopped == [] and started[1].stopped == ["its run did not use it"]
    assert ahead.take(inv, "nextcloud") is None


def test_a_second_start_for_a_database_still_waiting_starts_nothing(
        tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    assert len(ahead.start_ahead(inv, ["immich"])) == 1
    assert ahead.start_ahead(inv, ["immich"]) == [] and len(started) == 1


def test_a_restic_no_longer_waiting_is_not_handed_out(tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    ahead.start_ahead(inv, ["immich"])
    started[0].waiting = False  # expired
    assert ahead.take(inv, "immich") is None


def _pending(inv: Inventory, name: str) -> None:
    pending_store(inv, name).add(PendingAttempt(
        backup_id="20260101T020000Z-abcdef", snapshot_host=inv.lab.name,
        since="2026-01-01T02:00:00+00:00", reason="test"))


def _job(inv: Inventory, name: str) -> Any:
    class Job:
        pending = pending_store(inv, name)
    return Job()


def test_a_backup_takes_the_restic_only_with_its_backup_id_and_nothing_to_sweep(
        tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    [one] = ahead.start_ahead(inv, ["immich"])
    assert database._usable(one, _job(inv, "immich"), None) is one
    assert database._usable(one, _job(inv, "immich"), one.backup_id) is one
    assert started[0].stopped == []
    assert database._usable(one, _job(inv, "immich"), "20260101T000000Z-000000") is None
    assert started[0].stopped == ["another backup id was asked for"]


def test_a_backup_with_attempts_to_sweep_stops_the_restic_before_sweeping(
        tmp_path, monkeypatch, started):
    inv = _inventory(tmp_path, monkeypatch)
    [one] = ahead.start_ahead(inv, ["immich"])
    _pending(inv, "immich")
    assert database._usable(one, _job(inv, "immich"), None) is None
    assert started[0].stopped == ["earlier failed attempts are swept first"]


def test_the_command_line_and_a_served_backup_run_start_restic_ahead_of_the_engine(
        monkeypatch):
    """`backup run` and a served run of pg_backup wrap the flow in restic_ahead with the
    run's parameters; a served run of another flow starts nothing."""
    import flows.pg_backup as flow_mod
    from deployments import warm_start

    seen: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def fake(**params: Any) -> Iterator[None]:
        seen.append(params)
        yield

    monkeypatch.setattr(flow_mod, "restic_ahead", fake)
    with warm_start.ahead_of_run(flow_mod.pg_backup_flow, {"databases": ["immich"]}):
        pass
    with warm_start.ahead_of_run(flow_mod.pg_backup_flow, None):
        pass
    from flows.doctor import doctor_flow

    assert isinstance(warm_start.ahead_of_run(doctor_flow, {}), contextlib.nullcontext)
    assert seen == [{"lab": None, "databases": ["immich"], "repository": None},
                    {"lab": None, "databases": None, "repository": None}]


def test_restic_ahead_of_a_run_that_cannot_load_its_inventory_starts_nothing(
        tmp_path, started):
    from flows.pg_backup import restic_ahead

    with restic_ahead(lab=str(tmp_path / "missing.yaml")):
        pass
    assert started == []


def test_restic_ahead_starts_only_as_many_as_the_run_backs_up_at_once(
        tmp_path, monkeypatch, started):
    from flows.pg_backup import restic_ahead

    inv = _inventory(tmp_path, monkeypatch)
    with restic_ahead(lab=str(tmp_path / "lab.yaml")):
        assert [e.filename for e in started] == ["immich.sql"]
    assert started[0].stopped == ["its run did not use it"]
    data = yaml.safe_load((tmp_path / "lab.yaml").read_text())
    data["settings"]["pg_backup_parallel"] = 2
    (tmp_path / "lab.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    with restic_ahead(lab=str(tmp_path / "lab.yaml"), databases=["nextcloud", "immich"]):
        assert [e.filename for e in started[1:]] == ["nextcloud.sql", "immich.sql"]
    assert inv.lab.name


@pytest.mark.parametrize("value", ["1", "yes"])
def test_no_ahead_set_starts_nothing(tmp_path, monkeypatch, started, value):
    inv = _inventory(tmp_path, monkeypatch)
    monkeypatch.setenv("LABKEEPER_NO_AHEAD", value)
    assert ahead.start_ahead(inv, ["immich"]) == [] and started == []


@pytest.mark.parametrize("value", ["", "0", " "])
def test_no_ahead_empty_or_zero_is_not_set(value):
    assert not ahead.disabled({"LABKEEPER_NO_AHEAD": value})


def test_a_served_run_starts_restic_ahead_before_the_engine_and_stops_it_after(monkeypatch):
    """deployments.warm_start._run_warm (a served run's forked process) enters
    restic_ahead with the run's parameters before Prefect's engine runs the flow, and
    leaves it after."""
    import cloudpickle
    from prefect import flow_engine

    import flows.pg_backup as flow_mod
    from deployments import warm_start

    events: list[Any] = []

    @contextlib.contextmanager
    def fake(**params: Any) -> Iterator[None]:
        events.append(("ahead", params))
        yield
        events.append(("after",))

    monkeypatch.setattr(flow_mod, "restic_ahead", fake)
    monkeypatch.setattr(flow_engine, "configure_from_env", lambda: None)
    monkeypatch.setattr(flow_engine, "run_flow",
                        lambda flow, **kw: events.append(("engine", kw["parameters"])))
    payload = cloudpickle.dumps((flow_mod.pg_backup_flow, None, {"databases": ["immich"]},
                                 None, {}, set(), None))
    warm_start._run_warm(payload, {})
    assert events == [("ahead", {"lab": None, "databases": ["immich"], "repository": None}),
                      ("engine", {"databases": ["immich"]}), ("after",)]
