"""deployments/warm_start.py: which process context a served run starts in, and when."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator

import pytest
from prefect import flow_engine

from deployments import warm_start


@pytest.fixture
def restored() -> Iterator[None]:
    before = flow_engine.multiprocessing
    yield
    flow_engine.multiprocessing = before  # type: ignore[attr-defined]


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
    warm = warm_start.install({})
    assert warm is not None and started == [True]
    ctx = flow_engine.multiprocessing.get_context("spawn")
    assert ctx is warm.ctx and ctx.get_start_method() == "forkserver"
    assert flow_engine.multiprocessing.Process is multiprocessing.Process  # the rest as before
    warm_start.uninstall()
    assert flow_engine.multiprocessing is multiprocessing


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
