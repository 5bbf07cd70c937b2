"""The `labkeeper` command line: the typer app and its commands.

cli/main.py is the entry point (the console script, ``python -m cli.main``): it tries
the warm runner first and imports this module only when the command runs in its own
process. ``from cli.main import app`` still works (cli.main forwards the names)."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from cli.main import prepare_environment
from labkeeper import log_setup

if TYPE_CHECKING:
    from typer import _click as click  # typer vendors click

# Before any Prefect import reads its settings (cli.main.prepare_environment says why).
prepare_environment(os.environ)

# Sub-commands that live in their own modules are imported only when named (the
# runbook, PITR, init and simulator modules cost ~1.5 s of imports together); `--help`
# lists (and so imports) them all.
_LAZY: dict[str, tuple[str, str]] = {
    # name: (module, how it is mounted: "app:<attribute>" | "register")
    "pvesim": ("labkeeper.pvesim.cli", "app:app"),
    "runbook": ("cli.runbook", "app:runbook_app"),
    "init": ("cli.init", "register"),
    "proxmox": ("cli.init", "register"),
    "wal": ("cli.pitr", "register"),
    "basebackup": ("cli.pitr", "register"),
    "restore": ("cli.pitr", "register"),
    "pitr": ("cli.pitr", "register"),
    "metrics": ("cli.services", "register"),
    "server": ("cli.services", "register"),
}
_LAZY_HELP = {"pvesim": "The Proxmox VE simulator.",
              "runbook": "Runbooks: list, show, run, approve."}
_loaded: dict[str, click.Command] = {}


def _load_lazy(name: str) -> click.Command | None:
    """The click command for a lazily mounted name (None: its module is absent)."""
    if name not in _loaded:
        import importlib

        module_name, how = _LAZY[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # the simulator is an optional part of a partial checkout
            if module_name != "labkeeper.pvesim.cli":
                raise
            return None
        if how == "register":
            holder = typer.Typer()
            module.register(holder)
            group = typer.main.get_group(holder)
            _loaded.update({n: c for n, c in group.commands.items() if n in _LAZY})
        else:
            # a group even when the sub-app has one command (`pvesim serve`)
            cmd = typer.main.get_group(getattr(module, how.split(":", 1)[1]))
            cmd.name = name
            cmd.help = _LAZY_HELP.get(name, cmd.help)
            _loaded[name] = cmd
    return _loaded.get(name)


class _LazyGroup(TyperGroup):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in _LAZY if n not in self.commands)]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in _LAZY:
            return _load_lazy(cmd_name)
        return super().get_command(ctx, cmd_name)


app = typer.Typer(no_args_is_help=True, add_completion=False, cls=_LazyGroup,
                  help="labkeeper: keep a Proxmox homelab provisioned, backed up and restorable.")
lab_app = typer.Typer(no_args_is_help=True, help="The local lab (real services on loopback).")
app.add_typer(lab_app, name="lab")


@app.callback()
def _print_records() -> None:
    """Every command prints labkeeper's log records on stderr as plain lines."""
    log_setup.print_to_stderr()


console = Console()
err_console = Console(stderr=True)

LabOption = Annotated[Path, typer.Option("--lab", "-l", help="Inventory file.",
                                         envvar="LABKEEPER_LAB")]


@app.command()
def validate(path: Annotated[Path, typer.Argument(help="Inventory file to check.")]) -> None:
    """Check an inventory; print every problem (file:line field: message) at once."""
    from labkeeper.inventory import problems_report, validate_file

    problems = validate_file(path)
    if problems:
        print(problems_report(problems), file=sys.stderr)
        raise typer.Exit(1)
    from labkeeper.inventory import load_inventory
    from labkeeper.inventory.advice import warnings

    for w in warnings(load_inventory(path)):
        print(f"{path}: warning: {w}", file=sys.stderr)
    console.print(f"{path}: ok")


def print_check_table(rows: list[dict[str, Any]]) -> None:
    table = Table(title="labkeeper doctor")
    for col in ("check", "target", "status", "latency", "detail"):
        table.add_column(col, overflow="fold")
    style = {"ok": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    for r in rows:
        table.add_row(str(r["check"]), str(r["target"]),
                      f"[{style.get(str(r['status']), '')}]{r['status']}[/]",
                      f"{r['latency_ms']} ms", str(r["detail"]))
    console.print(table)


@app.command()
def doctor(lab: LabOption = Path("lab.yaml"),
           json_out: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
           ) -> None:
    """Run the doctor flow: reachability and credentials of every part of the lab."""
    from labkeeper.errors import ConfigError
    from labkeeper.inventory import load_inventory

    try:
        load_inventory(lab)
    except ConfigError as exc:
        print("\n".join([str(exc), *exc.problems]), file=sys.stderr)
        raise typer.Exit(2) from None
    from flows.doctor import DoctorFailed, doctor_flow

    state = doctor_flow(lab=str(lab), return_state=True)
    result = state.result(raise_on_failure=False)
    rows = result.rows if isinstance(result, DoctorFailed) else result
    if isinstance(rows, list):
        if json_out:
            print(json.dumps(rows, indent=2))
        else:
            print_check_table(rows)
    if not state.is_completed():
        err_console.print(f"doctor: {state.name}: {result}", markup=False)
        raise typer.Exit(1)


@lab_app.command("up")
def lab_up(workdir: Annotated[Path, typer.Option("--dir")] = Path(".lab"),
           no_pvesim: bool = False) -> None:
    """Start the local lab in the foreground until Ctrl-C, then stop everything."""
    from labkeeper.locallab.lab import LocalLab
    from labkeeper.locallab.services import wait_for_interrupt

    lab = LocalLab(workdir, pvesim=not no_pvesim)
    with lab:
        console.print(f"local lab up; inventory: {lab.inventory_path}")
        console.print(json.dumps(lab.pids()))
        wait_for_interrupt()


@app.command()
def demo(workdir: Annotated[Path, typer.Option("--dir")] = Path(".demo"),
         wait: Annotated[bool, typer.Option(help="Stay up until Ctrl-C (default when "
                                                 "interactive).")] = sys.stdin.isatty(),
         port: Annotated[int, typer.Option(help="Prefect UI port.")] = 4200) -> None:
    """Start the local lab and a Prefect server, run the lab's jobs, show the UI address."""
    from cli import demo as demo_mod

    code = demo_mod.run_demo(workdir.resolve(), wait=wait, port=port, console=console)
    raise typer.Exit(code)


@app.command()
def ui(workdir: Annotated[Path, typer.Option("--dir")] = Path(".demo"),
       port: int = 4200) -> None:
    """Serve the Prefect UI over the demo's run history until Ctrl-C."""
    from labkeeper.locallab.prefect_server import LocalPrefectServer
    from labkeeper.locallab.services import wait_for_interrupt

    server = LocalPrefectServer(workdir.resolve() / "prefect", port=port)
    server.start()
    console.print(f"Prefect UI: {server.url}  (Ctrl-C stops it)")
    try:
        wait_for_interrupt()
    finally:
        server.stop()


provision_app = typer.Typer(no_args_is_help=True,
                            help="Make Proxmox match the inventory's guests.")
app.add_typer(provision_app, name="provision")


@provision_app.command("plan")
def provision_plan(lab: LabOption = Path("lab.yaml"),
                   json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show what apply would change (reads only; never changes anything)."""
    from cli.jobs import plan_cli

    raise typer.Exit(plan_cli(lab, json_out))


@provision_app.command("apply")
def provision_apply(
    lab: LabOption = Path("lab.yaml"),
    allow_restart: Annotated[bool, typer.Option(help="Restart guests whose changes "
                                                     "need it.")] = False,
    allow_destroy: Annotated[bool, typer.Option(help="Destroy guests marked "
                                                     "absent.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Confirm a large plan.")] = False,
) -> None:
    """Create, change and bootstrap guests so Proxmox matches the inventory (bootstrap
    markers on each guest: settings.provision.guest_state_dir)."""
    from cli.jobs import apply_cli

    raise typer.Exit(apply_cli(lab, allow_restart=allow_restart, allow_destroy=allow_destroy,
                               yes=yes))


vzdump_app = typer.Typer(no_args_is_help=True, help="Guest backups with vzdump.")
app.add_typer(vzdump_app, name="vzdump")


@vzdump_app.command("run")
def vzdump_run(
    job: Annotated[str, typer.Argument(help="A vzdump job of the inventory.")],
    lab: LabOption = Path("lab.yaml"),
    force: Annotated[bool, typer.Option(help="Back up guests already backed up in this "
                                             "schedule period.")] = False,
    dry_run_retention: Annotated[bool, typer.Option(help="List what retention would remove, "
                                                         "remove nothing.")] = False,
) -> None:
    """Back up the job's guests now: verify each archive, prune, copy off-site."""
    from cli.jobs import run_vzdump_cli

    raise typer.Exit(run_vzdump_cli(lab, job, force=force, dry_run_retention=dry_run_retention))


@vzdump_app.command("sync-jobs")
def vzdump_sync_jobs(lab: LabOption = Path("lab.yaml"),
                     apply: Annotated[bool, typer.Option("--apply")] = False) -> None:
    """Show (and with --apply make) Proxmox's own backup jobs match the inventory."""
    from cli.jobs import sync_jobs_cli

    raise typer.Exit(sync_jobs_cli(lab, apply))


backup_app = typer.Typer(no_args_is_help=True, help="PostgreSQL backups into restic.")
app.add_typer(backup_app, name="backup")
repo_app = typer.Typer(no_args_is_help=True, help="restic repository maintenance.")
app.add_typer(repo_app, name="repo")


@backup_app.command("run")
def backup_run(lab: LabOption = Path("lab.yaml"),
               db: Annotated[str | None, typer.Option("--db", help="Only this database.")]
               = None) -> None:
    """Dump the databases now, stream them into restic, verify; print the table."""
    from cli.jobs import run_backup_cli

    raise typer.Exit(run_backup_cli(lab, db))


@repo_app.command("maintain")
def repo_maintain(lab: LabOption = Path("lab.yaml"),
                  repository: Annotated[str | None, typer.Option("--repository")] = None,
                  dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what forget "
                                                        "would remove; change nothing.")]
                  = False) -> None:
    """forget per series by the retention policy, prune, check, report bucket usage."""
    from flows.repo_maintenance import repo_maintenance_flow

    state = repo_maintenance_flow(lab=str(lab), repository=repository, dry_run=dry_run,
                                  return_state=True)
    if not state.is_completed():
        print(f"repo maintenance: {state.name}: {state.message}", file=sys.stderr)
        raise typer.Exit(1)
    print(json.dumps(state.result(), indent=2, default=str))


paths_app = typer.Typer(no_args_is_help=True,
                        help="File trees backed up by restic on the hosts that hold them.")
app.add_typer(paths_app, name="paths")


@paths_app.command("run")
def paths_run(lab: LabOption = Path("lab.yaml"),
              host: Annotated[str | None, typer.Option("--host")] = None,
              name: Annotated[str | None, typer.Option("--name", help="One path set.")] = None,
              ) -> None:
    """Back up the inventory's path sets now (restic on each host, over SSH)."""
    from cli.jobs import run_path_backup_cli

    raise typer.Exit(run_path_backup_cli(lab, host, name))


@app.command()
def update(apps: Annotated[list[str] | None, typer.Argument(help="Apps (default: all).")]
           = None,
           lab: LabOption = Path("lab.yaml"),
           dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would happen; "
                                                 "change nothing.")] = False,
           force: Annotated[bool, typer.Option("--force", help="Update even when unhealthy, "
                                               "outside the window, or to an image that "
                                               "was rolled back before.")] = False,
           resolve: Annotated[str | None, typer.Option(
               "--resolve", help="An unfinished update too old to finish automatically: "
               "'keep' what runs, or 'rollback' to its protection.")] = None) -> None:
    """Update apps: protect, update, prove health, roll back automatically.
    Exit 0 updated/current/skipped, 2 rolled back (healthy on the old version), 3 not
    updated and needs attention (blocked, held, stale), 1 failed."""
    from cli.jobs import run_update_cli

    if resolve not in (None, "keep", "rollback"):
        raise typer.BadParameter("--resolve takes keep or rollback")
    raise typer.Exit(run_update_cli(lab, list(apps or []), dry_run=dry_run, force=force,
                                    resolve=resolve))  # type: ignore[arg-type]


drill_app = typer.Typer(no_args_is_help=True,
                        help="Disaster-recovery drills: restore for real, verify, time it.")
app.add_typer(drill_app, name="drill")


@drill_app.command("run")
def drill_run(target: Annotated[str | None, typer.Argument(
                  help="all (default), db:NAME, guest:NAME|VMID, repository[:NAME]")] = None,
              lab: LabOption = Path("lab.yaml")) -> None:
    """Run restore drills now; exit 1 when a drill failed or breached an objective."""
    from cli.jobs import run_drill_cli

    raise typer.Exit(run_drill_cli(lab, target))


@app.command()
def status(lab: LabOption = Path("lab.yaml"),
           json_out: Annotated[bool, typer.Option("--json", help="Print JSON rows.")] = False,
           days: Annotated[int, typer.Option(help="Failed runs of the last N days.")] = 7,
           ) -> None:
    """Is my lab safe? Last good backups against their objectives, drills, updates,
    failed runs. Exits 1 when anything is late, missing or failed."""
    from datetime import UTC, datetime

    from labkeeper import status as st
    from labkeeper.errors import ConfigError
    from labkeeper.inventory import load_inventory

    try:
        inv = load_inventory(lab)
    except ConfigError as exc:
        print("\n".join([str(exc), *exc.problems]), file=sys.stderr)
        raise typer.Exit(2) from None
    errors: list[tuple[str, str]] = []
    try:
        from tasks.history import failed_runs, late_runs

        runs = failed_runs(days) + late_runs()
    except Exception as exc:  # no Prefect server reachable: say so, still report
        runs, errors = [], [("prefect", f"run history not readable: {exc}")]
    facts = st.gather(inv, failed_runs=runs)
    facts = st.Facts(**{**facts.__dict__, "errors": [*facts.errors, *errors]})
    rows = st.evaluate(inv, facts)
    now = datetime.now(UTC)
    if json_out:
        print(json.dumps([r.as_dict(now) for r in rows], indent=2))
    else:
        table = Table(title=f"labkeeper status: {inv.lab.name}")
        for col in ("section", "target", "state", "age", "objective", "detail"):
            table.add_column(col, overflow="fold")
        style = {"ok": "green", "late": "bold red", "missing": "bold red",
                 "failed": "bold red", "warn": "yellow", "info": "dim"}
        for r in rows:
            age = r.age(now)
            table.add_row(r.section, r.target, f"[{style[r.state]}]{r.state}[/]",
                          st.fmt_age(age) if age is not None else "-", r.objective, r.detail)
        console.print(table)
        bad = sum(r.state in st.BAD for r in rows)
        console.print("[green]all within objectives[/]" if not bad else
                      f"[bold red]{bad} out of objective[/]")
    raise typer.Exit(st.exit_code(rows))


def _serve_inventory(lab: Path, explicit: bool) -> Any:
    """The inventory `serve` schedules from: ``--lab``/``$LABKEEPER_LAB`` must load; the
    default ``lab.yaml`` may be absent (then prefect.yaml's schedules are served)."""
    from labkeeper.errors import ConfigError
    from labkeeper.inventory import load_inventory

    if not explicit and not lab.exists():
        err_console.print(f"serve: no inventory at {lab}: serving prefect.yaml's schedules "
                          "(give --lab or set LABKEEPER_LAB to use the inventory's)",
                          markup=False)
        return None
    try:
        return load_inventory(lab)
    except ConfigError as exc:
        print("\n".join([str(exc), *exc.problems]), file=sys.stderr)
        raise typer.Exit(2) from None


@app.command()
def serve(
    lab: Annotated[Path | None, typer.Option(
        "--lab", "-l", envvar="LABKEEPER_LAB",
        help="Inventory: its schedules replace prefect.yaml's for the shipped deployments, "
             "and flow runs read it. Default: lab.yaml, if present.")] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Also serve Prometheus /metrics on this port (default: "
             "settings.metrics.listen_port of the inventory, if set).")] = None,
    metrics_address: Annotated[str | None, typer.Option(
        help="Address for /metrics (default: settings.metrics.listen_address, "
             "else 127.0.0.1).")] = None,
    show_schedules: Annotated[bool, typer.Option(
        "--schedules", help="Print every deployment's schedules and where they come "
                            "from, then exit.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="With --schedules: print "
                                                       "JSON rows.")] = False,
    sync_schedules: Annotated[bool, typer.Option(
        "--sync-schedules", help="Several machines: put the inventory's schedules and "
                                 "sites (each deployment on its site's work queue) on the "
                                 "deployments `prefect deploy --all` created on the Prefect "
                                 "server (PREFECT_API_URL), then exit.")] = False,
) -> None:
    """Serve every deployment in prefect.yaml from this process (single-machine mode),
    on the inventory's schedules; optionally /metrics alongside."""
    from deployments import serve as srv

    inv = _serve_inventory(lab or Path("lab.yaml"), explicit=lab is not None)
    if show_schedules:
        _print_schedules(srv.schedule_table(inv), json_out=json_out)
        return
    if sync_schedules:
        if inv is None:
            err_console.print("serve --sync-schedules needs the inventory (--lab)")
            raise typer.Exit(2)
        for line in srv.sync_schedules(inv):
            console.print(line, markup=False)
        return
    if inv is not None:
        # Flow runs are child processes: they must read the inventory the schedules came from.
        os.environ["LABKEEPER_LAB"] = str((lab or Path("lab.yaml")).resolve())
        cfg = inv.settings.metrics
        metrics_port = metrics_port if metrics_port is not None else cfg.listen_port
        metrics_address = metrics_address or (str(cfg.listen_address)
                                              if cfg.listen_address else None)
    if metrics_port is not None:
        console.print(f"metrics: http://{metrics_address or '127.0.0.1'}:{metrics_port}/metrics")
    from labkeeper import local_server as ls

    home = ls.local_server(os.environ)  # command-line runs fork from its warm runner
    runner_pid = ls.start_runner(home, os.environ)  # None: one serves already
    # `systemctl stop` (SIGTERM) shuts down as Ctrl-C does: the runner goes with us
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        srv.serve_all(inv, metrics_address=metrics_address, metrics_port=metrics_port)
    finally:
        if runner_pid is not None:
            ls.stop_runner(home)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_schedules(rows: list[dict[str, Any]], *, json_out: bool) -> None:
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.markup import escape

    table = Table(title="labkeeper deployments and their schedules")
    for col in ("deployment", "cron", "timezone", "parameters", "source"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["deployment"], r["cron"], r["timezone"],
                      escape(json.dumps(r["parameters"])) if r["parameters"] else "",
                      escape(r["source"]))
    console.print(table)


@app.command(hidden=True)
def runner(socket_path: Annotated[Path, typer.Option("--socket", help="Where to listen.")]
           ) -> None:
    """The warm runner flow commands fork from (internal: started beside the local
    Prefect server and by `serve`; see cli/runner.py)."""
    from cli import runner as zygote

    raise typer.Exit(zygote.serve(socket_path))
