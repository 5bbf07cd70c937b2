"""``labkeeper pvesim serve``: run the Proxmox VE simulator in the foreground."""

from __future__ import annotations

import os
import secrets
import signal
import threading
import uuid
from pathlib import Path
from typing import Annotated

import typer

from labkeeper.pvesim.server import Simulator

DEFAULT_ID = "labkeeper@pve!ci"  # the API token id (not a secret)

app = typer.Typer(help="The Proxmox VE simulator (a stateful PVE API on loopback HTTPS).")


def _write_secret_file(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")


def _from_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise typer.BadParameter(f"environment variable {name} is not set")
    return value


def _token_secret(env: str | None, secret_file: Path | None) -> str:
    """The token secret from ``env``, or a new one written to ``secret_file``."""
    if env:
        return _from_env(env)
    if secret_file is None:
        raise typer.BadParameter(
            "give --token-secret-env or --token-secret-file (secrets never go in argv)"
        )
    secret = str(uuid.UUID(bytes=secrets.token_bytes(16)))
    _write_secret_file(secret_file, secret)
    return secret


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on (loopback).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8006,
    state: Annotated[Path | None, typer.Option(help="JSON state file (loaded and saved).")] = None,
    nodes: Annotated[str, typer.Option(help="Comma-separated node names.")] = "pve1,pve2,pve3",
    token_id: Annotated[str, typer.Option(help="API token id user@realm!name.")] = DEFAULT_ID,
    token_secret_env: Annotated[str | None, typer.Option(
        help="Environment variable holding the token secret (never on the command line).")
    ] = None,
    token_secret_file: Annotated[Path | None, typer.Option(
        help="Write a generated token secret to this file (mode 0600).")] = None,
    root_password_env: Annotated[str | None, typer.Option(
        help="Environment variable holding root@pam's password for ticket logins.")] = None,
    task_duration: Annotated[float, typer.Option(help="Seconds each simulated task runs.")] = 1.0,
    fingerprint_file: Annotated[Path | None, typer.Option(
        help="Write the certificate's SHA-256 fingerprint here.")] = None,
    ca_file: Annotated[Path | None, typer.Option(help="Copy the certificate (PEM) here.")] = None,
) -> None:
    """Serve the simulated PVE API until interrupted (Ctrl-C or SIGTERM)."""
    secret = _token_secret(token_secret_env, token_secret_file)
    users = {}
    if root_password_env:
        users["root@pam"] = _from_env(root_password_env)
    sim = Simulator(
        nodes=tuple(n.strip() for n in nodes.split(",") if n.strip()),
        state_path=state,
        task_duration=task_duration,
        tokens={token_id: secret},
        users=users,
    )
    sim.start(host=host, port=port)
    if fingerprint_file is not None:
        fingerprint_file.write_text(sim.fingerprint + "\n", encoding="utf-8")
    if ca_file is not None:
        ca_file.write_text(Path(sim.ca_file).read_text(encoding="utf-8"), encoding="utf-8")
    typer.echo(f"pvesim listening on {sim.url}/api2/json")
    typer.echo(f"fingerprint {sim.fingerprint}")
    typer.echo(f"certificate {ca_file or sim.ca_file}")
    typer.echo(f"token {token_id} (secret from {token_secret_env or token_secret_file})")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
