"""The warm runner (cli/runner.py): flow commands fork from a process that has Prefect
and the flows imported, and behave as if they ran in their own process."""

from __future__ import annotations

import os
import pty
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from cli import runner_client as rc
from labkeeper import local_server as ls

ROOT = Path(__file__).resolve().parents[2]
SECRET_VAR = "LK_RUNNER_TEST_RESTIC_PW"
MARK_VAR = "LK_RUNNER_TEST_MARK"
# Other work may edit the checkout while these tests run: the runner would (rightly)
# stop serving code that changed on disk. Pinned, the stamp compares as equal.
PINNED = {rc.PIN: "test-runner"}


def wait_for(what: str, check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        threading.Event().wait(0.05)


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


def marked(mark: str) -> list[int]:
    """Processes whose environment carries ``mark`` (a command and what it started)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if f"{MARK_VAR}={mark}".encode() in (p / "environ").read_bytes():
                    found.append(int(p.name))
            except OSError:
                continue
    return [pid for pid in found if not gone(pid)]


def _measured() -> list[str]:
    """Under ``--cov`` the runner and the commands it forks are measured too: their data
    joins the session's. Only the runner's coverage patches ``os._exit`` and ``fork``
    (a forked command ends with ``os._exit``); the test processes' coverage must not."""
    import coverage

    cov = coverage.Coverage.current()
    if cov is None:
        return []
    rc_file = Path(tempfile.mkdtemp(prefix="lk-runner-cov-")) / "coveragerc"
    rc_file.write_text("[run]\n"
                       f"source = {', '.join(cov.config.source or [])}\n"
                       # absolute: the runner's directory is not the checkout
                       f"omit = {', '.join(str(ROOT / p) for p in cov.config.run_omit or [])}\n"
                       "patch = _exit, fork\n")
    data = Path(cov.config.data_file).resolve()
    return ["-m", "coverage", "run", "--parallel-mode", f"--rcfile={rc_file}",
            f"--data-file={data}"]


def start_zygote(home: Path, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({**PINNED, **extra_env})
    sock = home / rc.SOCKET_NAME
    proc = subprocess.Popen([sys.executable, *_measured(), "-m", "cli.main", "runner",
                             "--socket", str(sock)],
                            env=env, cwd=home, stdin=subprocess.DEVNULL,
                            stdout=open(home / "runner.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for("the runner's socket", lambda: sock.exists() or proc.poll() is not None)
    assert proc.poll() is None, (home / "runner.log").read_text()
    return proc


def stop_zygote(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def zygote(tmp_path_factory) -> Iterator[tuple[Path, subprocess.Popen[bytes]]]:
    """A runner whose own environment holds a WRONG repository password."""
    home = tmp_path_factory.mktemp("runner")
    proc = start_zygote(home, {SECRET_VAR: "wrong-password-of-the-runner"})
    try:
        yield home, proc
    finally:
        stop_zygote(proc)
    assert not (home / rc.SOCKET_NAME).exists()


@pytest.fixture(scope="module")
def env_inventory(lab, tmp_path_factory) -> Path:
    """The lab's inventory with the repository password as an ``env:`` reference."""
    doc = yaml.safe_load(lab.inventory_path.read_text())
    for repo in doc["repositories"]:
        repo["password"] = f"env:{SECRET_VAR}"
    path = tmp_path_factory.mktemp("runner-inv") / "lab.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def client_env(lab, home: Path, server, mark: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env.update({**PINNED, "LABKEEPER_PREFECT_HOME": str(home),
                "PREFECT_API_URL": server.api_url,
                "LABKEEPER_LOG_LEVEL": "DEBUG",
                SECRET_VAR: (lab.secrets_dir / "restic-password").read_text().strip(),
                MARK_VAR: mark or uuid.uuid4().hex, "LABKEEPER_CHILD_ENV": MARK_VAR})
    return env


def labkeeper(args: list[str], env: dict[str, str], **kw) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=ROOT, env=env,
                            text=True, stdout=kw.pop("stdout", subprocess.PIPE),
                            stderr=subprocess.PIPE, **kw)


def runs_in_child(err: str) -> int | None:
    for line in err.splitlines():
        if "runs in the runner's child" in line:
            return int(line.rsplit(" ", 1)[1])
    return None


def test_backup_via_the_runner_relays_output_and_exit_and_reads_the_clients_secret(
        lab, prefect_server, zygote, env_inventory):
    home, _proc = zygote
    env = client_env(lab, home, prefect_server)
    p = labkeeper(["backup", "run", "--lab", str(env_inventory), "--db", "photos"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, out + err
    assert runs_in_child(err), err  # the runner ran it (its environment's password is wrong)
    assert "pg_backup" in out and "photos" in out and "ok" in out
    # a failing command: the same exit code and message as in a process of its own
    bad = ["backup", "run", "--lab", str(env_inventory), "--db", "nosuchdb"]
    p = labkeeper(bad, env)
    out_r, err_r = p.communicate(timeout=300)
    q = labkeeper(bad, {**env, "LABKEEPER_NO_RUNNER": "1"})
    out_o, err_o = q.communicate(timeout=300)
    assert runs_in_child(err_r) and not runs_in_child(err_o)
    assert p.returncode == q.returncode == 1
    assert "nosuchdb" in out_r + err_r and "nosuchdb" in out_o + err_o


def _backup_in_child(env: dict[str, str], inventory: Path) -> str:
    """`backup run --db photos` through the runner, succeeded; its stderr."""
    p = labkeeper(["backup", "run", "--lab", str(inventory), "--db", "photos"], env)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and runs_in_child(err), out + err
    return err


def _run_logs(server, err: str) -> list[tuple[str, int, str]]:
    """(logger, level, message) of the flow run whose address the command printed."""
    import asyncio
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    found = re.search(r"flow-run/([0-9a-f-]{36})", err)
    assert found, err

    async def read() -> list[tuple[str, int, str]]:
        async with get_client() as c:
            logs = await c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(
                any_=[uuid.UUID(found.group(1))])))
        return [(lg.name, lg.level, lg.message) for lg in logs]

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        deadline = time.monotonic() + 30
        while True:  # the run's last log batch may land just after the command ends
            rows = asyncio.run(read())
            if any(n.startswith("labkeeper.pg_backup") for n, _l, _m in rows) \
                    or time.monotonic() > deadline:
                return rows
            time.sleep(0.2)


def test_a_command_with_the_runners_logging_keeps_its_set_up_and_logs_to_its_run(
        lab, prefect_server, zygote, env_inventory):
    err = _backup_in_child(client_env(lab, zygote[0], prefect_server), env_inventory)
    assert "Prefect's logging kept as the runner set it up" in err
    rows = _run_logs(prefect_server, err)
    assert any(n == "labkeeper.pg_backup.database" and lvl == 20 and "photos: backup" in m
               for n, lvl, m in rows), rows


def test_a_backup_through_the_runner_starts_its_restic_before_the_run_and_the_run_takes_it(
        lab, prefect_server, zygote, env_inventory):
    """`backup run` starts the dump's restic before Prefect's engine starts the run
    (labkeeper.pg_backup.ahead); the run's backup takes that restic over, with its
    backup id."""
    import re

    err = _backup_in_child(client_env(lab, zygote[0], prefect_server), env_inventory)
    started = re.search(r"photos: the dump's restic started ahead \(backup (\S+)\)", err)
    assert started, err
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if started.group(0) in line)
    assert any("taken over" in line and "after its early start" in line
               for line in lines[at:]), err
    # started before the run existed: the run's address is printed after it
    assert not any("flow-run/" in line for line in lines[:at]), err
    rows = _run_logs(prefect_server, err)
    assert any(f"photos: backup {started.group(1)} of" in m for _n, _l, m in rows), rows


def test_a_runner_started_for_a_command_keeps_its_prefect_settings_and_logs_to_its_run(
        lab, prefect_server, env_inventory, tmp_path):
    """The usual case, the runner started as a command starts it (``start_runner`` with
    the command's environment): the next command's child keeps Prefect's settings and
    logging as the runner built them, and its run is still recorded and logged on the
    command's server."""
    srv = ls.LocalServer(home=tmp_path, port=1)
    # a command's usual Prefect settings (this session's server fixture left its own
    # PREFECT_SERVER_* variables in the environment: no command has those)
    env = {k: v for k, v in client_env(lab, tmp_path, prefect_server).items()
           if not k.startswith("PREFECT_SERVER_") or k == "PREFECT_SERVER_ANALYTICS_ENABLED"}
    assert ls.start_runner(srv, env)
    try:
        wait_for("the runner's socket", lambda: ls.runner_socket(srv).exists())
        err = _backup_in_child(env, env_inventory)
    finally:
        assert ls.stop_runner(srv)
    assert "Prefect's settings and logging kept as the runner built them" in err, [
        line for line in err.splitlines() if "labkeeper.runner" in line]
    assert "built again" not in err
    rows = _run_logs(prefect_server, err)
    assert any(n == "labkeeper.pg_backup.database" and lvl == 20 and "photos: backup" in m
               for n, lvl, m in rows), rows


def test_a_command_with_other_logging_settings_gets_them_set_up_anew(
        lab, prefect_server, zygote, env_inventory):
    env = {**client_env(lab, zygote[0], prefect_server), "PREFECT_LOGGING_LEVEL": "DEBUG"}
    err = _backup_in_child(env, env_inventory)
    assert "Prefect's logging kept" not in err
    assert "| DEBUG   | prefect." in err  # Prefect's own debug lines: its new level
    assert any(n.startswith("labkeeper.") for n, _l, _m in _run_logs(prefect_server, err))


def test_the_runner_child_reads_the_clients_stdin_and_writes_to_its_terminal(
        lab, zygote, tmp_path):
    home, _proc = zygote
    env = {**os.environ, **PINNED, "LABKEEPER_PREFECT_HOME": str(home)}
    code = ("import sys; from cli import runner_client as rc; "
            "c = rc.run(sys.argv[1:]); sys.exit(99 if c is None else c)")
    with open(lab.inventory_path) as stdin:  # `validate /dev/stdin`: our fd 0, not its
        res = subprocess.run([sys.executable, "-c", code, "labkeeper", "validate",
                              "/dev/stdin"], stdin=stdin, env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "/dev/stdin: ok" in res.stdout, res.stdout + res.stderr
    # a terminal on stdout: rich styles the table (no escapes into a pipe)
    args = [sys.executable, "-c", code, "labkeeper", "serve", "--schedules", "--lab",
            str(lab.inventory_path)]
    piped = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout, piped.stderr
    main, sub = pty.openpty()
    try:
        tty = subprocess.run(args, env={**env, "TERM": "xterm"}, cwd=ROOT, stdout=sub,
                             stderr=subprocess.PIPE, timeout=120)
        os.close(sub)
        shown = b""
        while chunk := _read_pty(main):
            shown += chunk
    finally:
        os.close(main)
    assert tty.returncode == 0, tty.stderr
    assert b"\x1b[" in shown and b"deployment" in shown


def _read_pty(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except OSError:  # EIO: the other end is closed and drained
        return b""


@pytest.mark.parametrize("how", ["sigint", "client-killed"])
def test_an_interrupted_or_killed_client_ends_its_command_and_leaves_no_process(
        lab, prefect_server, zygote, env_inventory, how):
    home, _proc = zygote
    mark = uuid.uuid4().hex
    p = labkeeper(["backup", "run", "--lab", str(env_inventory), "--db", "photos"],
                  client_env(lab, home, prefect_server, mark))
    seen: list[str] = []
    assert p.stderr is not None

    def child_known() -> bool:
        seen.append(p.stderr.readline())
        return runs_in_child("".join(seen)) is not None or p.poll() is not None

    wait_for("the child's pid", child_known)
    child = runs_in_child("".join(seen))
    assert child is not None, "".join(seen)
    p.send_signal(signal.SIGINT if how == "sigint" else signal.SIGKILL)
    p.communicate(timeout=120)
    assert p.returncode != 0
    wait_for("the child to end", lambda: gone(child))
    wait_for("every process of the command to end", lambda: not marked(mark))


def test_two_commands_at_once_both_run_in_the_runner(lab, prefect_server, zygote,
                                                     env_inventory):
    home, _proc = zygote
    env = client_env(lab, home, prefect_server)
    procs = [labkeeper(["backup", "run", "--lab", str(env_inventory), "--db", db], env)
             for db in ("photos", "photos")]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out + err
        assert runs_in_child(err)
    assert len({runs_in_child(err) for _o, err in outs}) == 2


def test_a_client_of_other_code_is_refused_and_runs_the_command_itself(zygote, monkeypatch):
    home, proc = zygote
    env = {"LABKEEPER_PREFECT_HOME": str(home)}
    monkeypatch.setattr(rc, "code_stamp", lambda root=None, environ=None: "other code")
    assert rc.run(["labkeeper", "validate", "/nonexistent"], env) is None
    monkeypatch.undo()
    # the runner's own code did not change: it keeps serving
    assert proc.poll() is None and (home / rc.SOCKET_NAME).exists()


def test_a_peer_of_another_uid_gets_nothing(zygote):
    if os.getuid() != 0:
        pytest.skip("needs root to connect as another user")
    home, proc = zygote
    shared = Path(tempfile.mkdtemp(dir="/tmp", prefix="lk-runner-peer-"))
    try:
        shared.chmod(0o755)
        link = shared / "runner.sock"
        os.link(home / rc.SOCKET_NAME, link)  # the same socket, reachable by nobody
        link.chmod(0o666)
        probe = ("import socket, struct, sys\n"
                 "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                 "try:\n"
                 "    socket.send_fds(s, [struct.pack('!I', 2)], [0, 1, 2]); s.sendall(b'{}')\n"
                 "    print(repr(s.recv(100)))\n"
                 "except (BrokenPipeError, ConnectionResetError):\n"
                 "    print(repr(b''))\n")
        res = subprocess.run(["/usr/bin/python3", "-I", "-c", probe, str(link)], user=65534,
                             capture_output=True, text=True, timeout=60)
        assert res.stdout.strip() == "b''", res.stdout + res.stderr  # closed, no pid
        assert "refused a connection: peer uid 65534" in (home / "runner.log").read_text()
        assert proc.poll() is None
    finally:
        for p in shared.iterdir():
            p.unlink()
        shared.rmdir()


def test_a_killed_runner_leaves_commands_to_their_own_process(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    proc = start_zygote(home, {})
    proc.kill()
    proc.wait(timeout=60)
    assert (home / rc.SOCKET_NAME).exists()  # stale: nobody listens
    assert rc.run(["labkeeper", "backup", "run"], {"LABKEEPER_PREFECT_HOME": str(home)}) \
        is None
    # a new runner takes the stale place
    again = start_zygote(home, {})
    try:
        sock = socket.socket(socket.AF_UNIX)
        wait_for("the new runner", lambda: sock.connect_ex(str(home / rc.SOCKET_NAME)) == 0)
        sock.close()
    finally:
        stop_zygote(again)


def test_the_local_server_starts_and_stops_its_runner_by_pid(tmp_path):
    srv = ls.LocalServer(home=tmp_path / "prefect", port=1)
    pid = ls.start_runner(srv, {**os.environ, **PINNED})
    assert pid is not None
    try:
        wait_for("the runner to serve", lambda: ls.runner_alive(srv) or gone(pid))
        assert ls.runner_alive(srv), (srv.home / "runner.log").read_text()
        assert ls.start_runner(srv, {**os.environ, **PINNED}) is None  # one per home
    finally:
        assert ls.stop_runner(srv)
    assert gone(pid) and not ls.runner_alive(srv)
    assert not ls.runner_socket(srv).exists()
