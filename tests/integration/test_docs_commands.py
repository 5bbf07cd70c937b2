"""Every `labkeeper` command line the README and the guides show is one the installed
command accepts, and the ones that need no real lab run as shown.

Command lines are read from the ``sh`` blocks of README.md and docs/*.md. A line with
synopsis notation (``[--opt]``, ``a|b``, ``...``, ``<id>``, NAME placeholders) must name
a real sub-command and real options; any other line must parse (known options, every
required option and argument given). :data:`RUN` lists the lines run for real, in a
scratch directory or the repository; the others need a lab (a database, Proxmox, a
Prefect server).
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer import _click as click  # typer vendors click (as cli/main.py uses it)

from cli import main as cli

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LABKEEPER = str(Path(sys.executable).parent / "labkeeper")

RUN: dict[str, str] = {
    # command line as the docs show it: where it runs ("tmp": a scratch directory, in
    # this order, so `init` writes the lab.yaml that `validate` then reads)
    "labkeeper init -o lab.yaml": "tmp",
    "labkeeper validate lab.yaml": "tmp",
    "labkeeper validate examples/backup-only.yaml": "repo",
    "labkeeper runbook list": "repo",
    "labkeeper runbook show restore-database": "repo",
}
SERVE = "labkeeper pvesim serve --port 8006 --token-secret-file pve-token"
"""Runs until stopped: started, awaited until it listens, then stopped (on port 0:
8006 may be taken on a shared machine)."""

_PLACEHOLDER = re.compile(r"\[|\||\.\.\.|…|<[^>]+>|(?<![-\w])[A-Z][A-Z_]+(?![\w])")


def documented_commands() -> list[tuple[str, str]]:
    """(file, command line) for each `labkeeper` command in a shell block; ``&&`` splits
    a line, a trailing ``  # comment`` is dropped, ``\\`` continues a line."""
    found = []
    for doc in DOCS:
        in_block, lang, pending = False, "", ""
        for raw in doc.read_text().splitlines():
            if raw.startswith("```"):
                in_block, lang = not in_block, raw[3:].strip()
                continue
            if not in_block or lang not in ("sh", "bash", "shell", "console", ""):
                continue
            line = raw.strip()
            if not pending and not line.startswith("labkeeper "):
                continue
            pending = f"{pending} {line}".strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            text, pending = re.split(r"\s+#\s", pending, maxsplit=1)[0].strip(), ""
            for part in text.split("&&"):
                found.append((doc.name, " ".join(part.split())))
    return found


COMMANDS = documented_commands()


def _is_group(cmd: click.Command) -> bool:
    return hasattr(cmd, "get_command")


def _resolve(words: list[str]) -> tuple[click.Command, list[str], click.Context]:
    """The click command a line names, and the words left for it."""
    root = typer.main.get_command(cli.app)
    ctx = click.Context(root, info_name="labkeeper")
    cmd: click.Command = root
    rest = words[1:]
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            break
        cmd, rest = sub, rest[1:]
        ctx = click.Context(cmd, info_name=cmd.name, parent=ctx)
    return cmd, rest, ctx


def test_the_docs_show_commands_and_every_run_entry_is_among_them():
    shown = {line for _doc, line in COMMANDS}
    assert len(shown) >= 20
    assert set(RUN) | {SERVE} <= shown, sorted(set(RUN) | {SERVE} - shown)


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[f"{d}:{ln[:60]}" for d, ln in COMMANDS])
def test_each_documented_command_names_real_commands_and_options(doc, line):
    if _PLACEHOLDER.search(line):
        # synopsis: the first alternative of each a|b, placeholders kept as words
        words = [w.split("|")[0].strip("[]") for w in line.split()]
        cmd, rest, _ctx = _resolve([w for w in words if w])
        assert not _is_group(cmd), f"{doc}: `{line}` names no command"
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        used = {w.split("=")[0] for w in rest if w.startswith("-")}
        assert used <= known, f"{doc}: `{line}`: unknown option(s) {sorted(used - known)}"
        return
    cmd, rest, ctx = _resolve(shlex.split(line))
    try:
        cmd.make_context(cmd.name, rest, parent=ctx.parent)
    except click.ClickException as exc:
        pytest.fail(f"{doc}: `{line}` is refused: {exc.format_message()}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABKEEPER_")}
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"  # no command here may need a server
    return env


def test_the_documented_commands_that_need_no_lab_run_as_shown(tmp_path):
    for line, where in RUN.items():
        argv = [LABKEEPER, *shlex.split(line)[1:]]
        res = subprocess.run(argv, cwd=tmp_path if where == "tmp" else REPO, env=_env(),
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0, f"`{line}` exited {res.returncode}: {res.stderr[-2000:]}"
    assert (tmp_path / "lab.yaml").is_file()


def test_the_documented_simulator_command_serves(tmp_path):
    argv = [LABKEEPER, *shlex.split(SERVE.replace("--port 8006", "--port 0"))[1:]]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until it listens or exits
        assert first.startswith("pvesim listening on https://127.0.0.1:"), \
            first + proc.stdout.read() if proc.poll() is not None else first
        assert (tmp_path / "pve-token").stat().st_mode & 0o777 == 0o600
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
