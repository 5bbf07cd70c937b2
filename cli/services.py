"""``labkeeper metrics serve|show`` and ``labkeeper server status|start|stop``: the
long-running helpers beside the jobs (the Prometheus endpoint, the local Prefect
server and the warm runner beside it). Mounted lazily by cli/app.py."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli.app import LabOption

console = Console()
err_console = Console(stderr=True)


def register(app: typer.Typer) -> None:
    app.add_typer(metrics_app, name="metrics")
    app.add_typer(server_app, name="server")


metrics_app = typer.Typer(no_args_is_help=True,
                          help="Prometheus metrics the flows record (textfile and /metrics).")


def _metrics_inventory(lab: Path) -> Any:
    from labkeeper.errors import ConfigError
    from labkeeper.inventory import load_inventory

    try:
        return load_inventory(lab)
    except ConfigError as exc:
        print("\n".join([str(exc), *exc.problems]), file=sys.stderr)
        raise typer.Exit(2) from None


@metrics_app.command("serve")
def metrics_serve(
    lab: LabOption = Path("lab.yaml"),
    port: Annotated[int | None, typer.Option(
        help="Default: settings.metrics.listen_port.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Default: settings.metrics.listen_address, else 127.0.0.1.")] = None,
) -> None:
    """Serve /metrics (Prometheus text format) from the metrics store until Ctrl-C
    (or SIGTERM)."""
    import signal
    import threading

    from labkeeper import metrics

    inv = _metrics_inventory(lab)
    cfg = inv.settings.metrics
    port = port if port is not None else cfg.listen_port
    if port is None:
        err_console.print("metrics serve: give --port or settings.metrics.listen_port")
        raise typer.Exit(2)
    address = address or (str(cfg.listen_address) if cfg.listen_address else "127.0.0.1")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the port opens: no early-signal race
        signal.signal(sig, lambda signum, frame: stop.set())
    server: Any = metrics.serve(inv.settings.state_dir, address, port)
    console.print(f"serving http://{address}:{port}/metrics from "
                  f"{inv.settings.state_dir}/metrics.json (Ctrl-C stops)", markup=False)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        server.server_close()


@metrics_app.command("show")
def metrics_show(lab: LabOption = Path("lab.yaml")) -> None:
    """Print the metrics as Prometheus text (what /metrics and the textfile hold)."""
    from labkeeper import metrics

    inv = _metrics_inventory(lab)
    print(metrics.render(metrics.Store(inv.settings.state_dir)), end="")


server_app = typer.Typer(no_args_is_help=True, help="The local Prefect server command-line "
                         "runs record to when PREFECT_API_URL is not set.")


@server_app.command("status")
def server_status() -> None:
    """Say which Prefect server a command would use, and whether it answers."""
    from labkeeper import local_server as ls

    configured = ls.configured_api_url(os.environ)
    srv = ls.local_server(os.environ)
    url = configured or srv.api_url
    up = ls.healthy(url)
    console.print(f"{'configured' if configured else 'local'}: {url} "
                  f"{'answers' if up else 'does not answer'}"
                  + ("" if configured else f" (home {srv.home})"), markup=False)
    console.print(f"warm runner: {ls.runner_socket(srv)} "
                  f"{'serves' if ls.runner_alive(srv) else 'is not running'}", markup=False)
    raise typer.Exit(0 if up else 1)


@server_app.command("start")
def server_start() -> None:
    """Start the local server now (commands start it on first use anyway)."""
    from labkeeper import local_server as ls

    srv = ls.local_server(os.environ)
    how = ls.ensure(srv)
    console.print(f"{how}: {srv.url} (home {srv.home})", markup=False)


@server_app.command("stop")
def server_stop() -> None:
    """Stop the local server a command started (by the pid in its pid file)."""
    from labkeeper import local_server as ls

    srv = ls.local_server(os.environ)
    stopped = ls.stop(srv)  # its warm runner too
    ls.stop_runner(srv)  # also the one beside a server this command did not start
    console.print("stopped" if stopped else f"no local server recorded in {srv.home}")
