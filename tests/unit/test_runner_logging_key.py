"""cli/runner.logging_key and settings_key: what decides whether a runner child sets
Prefect's logging up again (a different key) or keeps the runner's (the same), and
whether it builds Prefect's settings again at all."""

from __future__ import annotations

from pathlib import Path

from cli.runner import logging_key, settings_key


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(home), "PATH": "/usr/bin", "PREFECT_API_URL": "http://x/api",
            "PREFECT_LOGGING_EXTRA_LOGGERS": "labkeeper", **extra}


def test_same_logging_settings_in_other_homes_and_directories_give_the_same_key(
        tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # no [tool.prefect]
    key_a = logging_key(_env(a), str(a))
    key_b = logging_key(_env(b, PREFECT_API_URL="http://y/api", LABKEEPER_LOG_LEVEL="DEBUG"),
                        str(b))
    assert key_a == key_b


def test_a_prefect_logging_variable_changes_the_key(tmp_path: Path) -> None:
    base = logging_key(_env(tmp_path), str(tmp_path))
    assert logging_key(_env(tmp_path, PREFECT_LOGGING_LEVEL="DEBUG"), str(tmp_path)) != base
    assert logging_key(_env(tmp_path, PREFECT_PROFILE="other"), str(tmp_path)) != base


def test_the_profiles_file_logging_file_or_a_prefect_settings_file_change_the_key(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".prefect").mkdir(parents=True)
    base = logging_key(_env(home), str(tmp_path))
    (home / ".prefect" / "profiles.toml").write_text("[profiles.default]\n")
    with_profiles = logging_key(_env(home), str(tmp_path))
    assert with_profiles != base
    (home / ".prefect" / "logging.yml").write_text("version: 1\n")
    with_logging = logging_key(_env(home), str(tmp_path))
    assert with_logging != with_profiles
    (tmp_path / "pyproject.toml").write_text("[tool.prefect]\nlogging_level = 'DEBUG'\n")
    assert logging_key(_env(home), str(tmp_path)) != with_logging
    (tmp_path / ".env").write_text("PREFECT_LOGGING_LEVEL=DEBUG\n")
    assert logging_key(_env(home), str(tmp_path)) != with_logging


def test_any_prefect_variable_or_home_changes_the_settings_key_other_variables_do_not(
        tmp_path: Path) -> None:
    base = settings_key(_env(tmp_path), str(tmp_path))
    assert settings_key(_env(tmp_path, LABKEEPER_LOG_LEVEL="DEBUG", PATH="/bin"),
                        str(tmp_path)) == base
    assert settings_key(_env(tmp_path, PREFECT_API_URL="http://y/api"), str(tmp_path)) != base
    assert settings_key(_env(tmp_path, PREFECT_API_KEY="k"), str(tmp_path)) != base
    assert settings_key({**_env(tmp_path), "HOME": "/elsewhere"}, str(tmp_path)) != base


def test_a_prefect_settings_file_in_the_working_directory_changes_the_settings_key(
        tmp_path: Path) -> None:
    base = settings_key(_env(tmp_path), str(tmp_path))
    (tmp_path / "prefect.toml").write_text("[api]\nurl = 'http://z/api'\n")
    assert settings_key(_env(tmp_path), str(tmp_path)) != base
