"""Which Prefect server a command-line run uses (labkeeper/local_server.py, cli.py)."""

from __future__ import annotations

from pathlib import Path

from cli.main import prefect_for_command
from labkeeper import local_server as ls
from labkeeper.locallab.ports import free_port


def test_api_url_in_the_environment_is_used_as_configured(tmp_path):
    env = {"PREFECT_API_URL": "http://10.0.0.5:4200/api", "HOME": str(tmp_path)}
    assert ls.configured_api_url(env) == "http://10.0.0.5:4200/api"
    assert prefect_for_command(["backup", "run"], env) == "configured"
    assert env["PREFECT_API_URL"] == "http://10.0.0.5:4200/api"


def test_api_url_of_the_active_prefect_profile_counts_as_configured(tmp_path):
    home = tmp_path / "ph"
    home.mkdir()
    (home / "profiles.toml").write_text(
        'active = "lab"\n[profiles.lab]\nPREFECT_API_URL = "http://nas:4200/api"\n'
        '[profiles.local]\n')
    env = {"PREFECT_HOME": str(home)}
    assert ls.configured_api_url(env) == "http://nas:4200/api"
    assert ls.configured_api_url({**env, "PREFECT_PROFILE": "local"}) is None


def test_local_server_defaults_to_the_state_dir_and_prefects_port():
    srv = ls.local_server({"HOME": "/home/u"})
    assert srv.home == Path("/home/u/.local/state/labkeeper/prefect")
    assert srv.api_url == "http://127.0.0.1:4200/api"
    srv = ls.local_server({"LABKEEPER_PREFECT_HOME": "/srv/p", "LABKEEPER_PREFECT_PORT": "4300"})
    assert (srv.home, srv.port) == (Path("/srv/p"), 4300)


def test_server_env_passes_server_settings_but_no_client_api_or_secrets(tmp_path):
    srv = ls.LocalServer(home=tmp_path, port=4321)
    env = ls.server_env(srv, {"PATH": "/usr/bin", "RESTIC_PASSWORD": "hunter2",
                              "PREFECT_API_URL": "http://elsewhere/api",
                              "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://x"})
    assert env["PREFECT_API_URL"] == srv.api_url and env["PREFECT_SERVER_API_PORT"] == "4321"
    assert env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://x"
    assert "RESTIC_PASSWORD" not in env and env["PREFECT_HOME"] == str(tmp_path)


def test_commands_without_flows_never_look_for_a_server(tmp_path):
    env = {"HOME": str(tmp_path), "LABKEEPER_PREFECT_HOME": str(tmp_path / "p")}
    for argv in (["validate", "lab.yaml"], ["provision", "plan"], ["backup", "run", "--help"],
                 ["serve", "--schedules"], ["metrics", "show"], []):
        assert prefect_for_command(argv, env) is None, argv
    assert "PREFECT_API_URL" not in env and not (tmp_path / "p").exists()


def test_status_uses_a_local_server_only_if_one_answers_and_never_starts_one(tmp_path):
    env = {"HOME": str(tmp_path), "LABKEEPER_PREFECT_HOME": str(tmp_path / "p"),
           "LABKEEPER_PREFECT_PORT": str(free_port())}
    assert prefect_for_command(["status"], env) == "none"
    assert "PREFECT_API_URL" not in env and not (tmp_path / "p").exists()


def test_stop_leaves_a_process_alone_whose_pid_was_reused(tmp_path):
    import json
    import subprocess

    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        srv = ls.LocalServer(home=tmp_path, port=free_port())
        srv.pidfile.write_text(json.dumps({"pid": other.pid, "url": srv.url}))
        assert ls.stop(srv) is False
        assert other.poll() is None and not srv.pidfile.exists()
    finally:
        other.kill()
        other.wait()


def test_the_installed_command_decides_on_the_prefect_server_before_running():
    """The console script must enter through main() (which points Prefect at the
    configured or local server before any flow is imported), not the bare typer app:
    through `app` every flow command started a temporary server again."""
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "labkeeper"]
    assert script.value == "cli.main:main"


def test_a_runner_gets_the_local_servers_address_and_home_a_command_will_get(tmp_path):
    srv = ls.LocalServer(home=tmp_path / "p", port=4321)
    env = ls.runner_prefect_env(srv, {"HOME": str(tmp_path), "PATH": "/usr/bin",
                                      "PREFECT_LOGGING_LEVEL": "DEBUG"})
    # what use_for_command sets in a command's environment, and its logging settings
    assert env == {"PREFECT_API_URL": srv.api_url, "PREFECT_HOME": str(srv.home),
                   "PREFECT_LOGGING_LEVEL": "DEBUG"}


def test_a_runner_gets_a_configured_servers_plain_settings_but_never_a_secret(tmp_path):
    srv = ls.LocalServer(home=tmp_path / "p", port=4321)
    secrets = {"PREFECT_API_KEY": "pnu_secret", "PREFECT_API_AUTH_STRING": "admin:pw",
               "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://u:pw@db/p"}
    env = ls.runner_prefect_env(srv, {"PREFECT_API_URL": "http://nas:4200/api",
                                      "PREFECT_PROFILE": "lab", "RESTIC_PASSWORD": "x",
                                      **secrets})
    assert env == {"PREFECT_API_URL": "http://nas:4200/api", "PREFECT_PROFILE": "lab"}


def test_a_configured_address_holding_credentials_is_not_given_to_a_runner(tmp_path):
    srv = ls.LocalServer(home=tmp_path / "p", port=4321)
    env = ls.runner_prefect_env(srv, {"PREFECT_API_URL": "https://admin:pw@nas:4200/api"})
    assert "PREFECT_API_URL" not in env and "pw" not in repr(env)
