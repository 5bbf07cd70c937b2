"""deployments/warm_start.py: which process context a served run starts in, and when."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Iterator

import pytest
from prefect import flow_engine

from deployments import warm_start


@pytest.fixture
def restored() -> Iterator[None]:
    from prefect.runner import _starter_direct

    before = flow_engine.multiprocessing
    starter = _starter_direct.run_flow_in_subprocess
    yield
    flow_engine.multiprocessing = before  # type: ignore[attr-defined]
    _starter_direct.run_flow_in_subprocess = starter


def test_no_runner_set_keeps_prefects_spawn(restored: None) -> None:
    assert warm_start.install({"LABKEEPER_NO_RUNNER": "1"}) is None
    assert flow_engine.multiprocessing is multiprocessing


@pytest.mark.parametrize("value", ["", "0", " "])
def test_no_runner_empty_or_zero_is_not_set(value: str) -> None:
    assert not warm_start.disabled({"LABKEEPER_NO_RUNNER": value})


def test_install_answers_spawn_with_the_preloaded_forkserver_then_uninstall_restores(
        restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[bool] = []
    monkeypatch.setattr(warm_start.WarmStart, "start_server", lambda self: started.append(True))
    from prefect.runner import _starter_direct

    warm = warm_start.install({})
    assert warm is not None and started == [True]
    ctx = flow_engine.multiprocessing.get_context("spawn")
    assert ctx is warm.ctx and ctx.get_start_method() == "forkserver"
    assert flow_engine.multiprocessing.Process is multiprocessing.Process  # the rest as before
    assert _starter_direct.run_flow_in_subprocess == warm.run_flow_in_subprocess
    warm_start.uninstall()
    assert flow_engine.multiprocessing is multiprocessing
    assert _starter_direct.run_flow_in_subprocess is flow_engine.run_flow_in_subprocess


def test_a_prefect_without_the_direct_starter_still_forks_warm_through_the_proxy(
        restored: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.runner import _starter_direct

    monkeypatch.setattr(warm_start.WarmStart, "start_server", lambda self: None)
    monkeypatch.setattr(warm_start, "_direct_starter", lambda: None)
    before = _starter_direct.run_flow_in_subprocess
    warm = warm_start.install({})
    assert warm is not None
    assert flow_engine.multiprocessing.get_context("spawn") is warm.ctx
    assert _starter_direct.run_flow_in_subprocess is before
    warm_start.uninstall()
    assert flow_engine.multiprocessing is multiprocessing

def test_a_runs_own_prefect_settings_change_the_settings_key_other_variables_do_not(
        ) -> None:
    base = warm_start.settings_key()
    assert warm_start.settings_key({"PREFECT_LOGGING_LEVEL": "DEBUG"}) != base
    assert warm_start.settings_key({"PREFECT__FLOW_RUN_ID": "x", "LK_OTHER": "y",
                                    "PREFECT_LOGGING_LEVEL": None}) == base


@pytest.mark.parametrize("same", [True, False])
def test_warm_child_keeps_the_forkservers_settings_only_when_the_runs_are_the_same(
        monkeypatch: pytest.MonkeyPatch, same: bool) -> None:
    """The child's side of a warm run: the run's environment applied, then the flow run
    under the forkserver's settings object (same settings) or freshly built ones."""
    import cloudpickle
    from prefect.context import get_settings_context
    from prefect.settings import get_current_settings

    seen: dict[str, object] = {}

    def run_flow(flow: object, **kwargs: object) -> None:
        seen.update(flow=flow, settings=get_current_settings(),
                    env=os.environ.get("LK_WARM_PROBE"), gone=os.environ.get("LK_WARM_GONE"),
                    **kwargs)

    monkeypatch.setattr(flow_engine, "run_flow", run_flow)
    monkeypatch.setattr(flow_engine, "configure_from_env", lambda: None)
    monkeypatch.setenv("LK_WARM_PROBE", "before")
    monkeypatch.setenv("LK_WARM_GONE", "here")
    monkeypatch.setattr(warm_start, "_forkserver_settings", warm_start.settings_key())
    key = warm_start.settings_key() if same else warm_start.settings_key(
        {"PREFECT_LOGGING_LEVEL": "DEBUG"})
    payload = cloudpickle.dumps(("the flow", None, {"a": 1}, None,
                                 {"LK_WARM_PROBE": "the run's"}, {"LK_WARM_GONE"}, key))
    warm_start._run_warm(payload, {})
    assert seen["flow"] == "the flow" and seen["parameters"] == {"a": 1}
    assert seen["env"] == "the run's" and seen["gone"] is None
    kept = get_settings_context().settings
    assert (seen["settings"] is kept) is same


def test_code_changed_on_disk_starts_runs_fresh_and_warns_once(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(warm_start, "code_stamp", lambda: "as started")
    warm = warm_start.WarmStart(preload=())
    proxy = warm_start._WarmWhenCurrent(warm.ctx, warm.current)
    assert proxy.get_context("spawn") is warm.ctx
    monkeypatch.setattr(warm_start, "code_stamp", lambda: "edited since")
    with caplog.at_level(logging.WARNING, logger="labkeeper.serve"):
        first = proxy.get_context("spawn")
        second = proxy.get_context("spawn")
    assert first is multiprocessing.get_context("spawn") and second is first
    # one record (the capture handler may see it on two loggers)
    warnings = {id(r): r for r in caplog.records if "changed on disk" in r.getMessage()}
    assert len(warnings) == 1
    assert [r.levelno for r in warnings.values()] == [logging.WARNING]


def test_other_start_methods_are_multiprocessings_own() -> None:
    warm = warm_start.WarmStart(preload=())
    proxy = warm_start._WarmWhenCurrent(warm.ctx, lambda: True)
    assert proxy.get_context("fork") is multiprocessing.get_context("fork")


def test_preload_names_only_importable_modules() -> None:
    import importlib.util

    assert [m for m in warm_start.PRELOAD if importlib.util.find_spec(m) is None] == []
