"""`labkeeper runbook ...`: list, show, run and approve runbooks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from labkeeper import runbook as rb
from labkeeper.errors import ConfigError

runbook_app = typer.Typer(no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)

LabOption = Annotated[Path, typer.Option("--lab", "-l", help="Inventory file.",
                                         envvar="LABKEEPER_LAB")]


def _fail(exc: ConfigError) -> None:
    err_console.print(str(exc), markup=False)
    for p in exc.problems:
        if p not in str(exc):
            err_console.print(f"  {p}", markup=False)
    raise typer.Exit(2)


@runbook_app.command("list")
def list_runbooks() -> None:
    """Every runbook in runbooks/ with its description (invalid files are named)."""
    bad = 0
    for name, path in rb.runbook_files().items():
        try:
            book = rb.load_runbook(path)
        except ConfigError as exc:
            bad += 1
            console.print(f"[red]{name}[/red]: INVALID", highlight=False)
            for why in exc.problems or [str(exc)]:
                console.print(f"  {why}", markup=False, highlight=False)
            continue
        console.print(f"[bold]{name}[/bold]  {book.description.strip()}", highlight=False)
    raise typer.Exit(1 if bad else 0)


@runbook_app.command("show")
def show(name: Annotated[str, typer.Argument(help="Runbook name.")]) -> None:
    """A runbook's parameters and steps."""
    try:
        console.print(rb.describe(rb.find_runbook(name)), markup=False, highlight=False)
    except ConfigError as exc:
        _fail(exc)


@runbook_app.command("run")
def run(name: Annotated[str, typer.Argument(help="Runbook name.")],
        param: Annotated[list[str] | None, typer.Option(
            "--param", "-p", help="A parameter, NAME=VALUE (repeatable).")] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and show, change "
                                              "nothing.")] = False,
        yes: Annotated[bool, typer.Option("--yes", help="Approve every approval step up "
                                          "front.")] = False,
        lab: LabOption = Path("lab.yaml")) -> None:
    """Run a runbook now, as a Prefect flow run (approvals pause it unless --yes; checked
    for an answer every settings.tuning.approval_poll seconds)."""
    from flows.runbook import runbook_flow
    from labkeeper.inventory import load_inventory

    try:
        book = rb.find_runbook(name)
        params = rb.parse_cli_params(param or [])
        rb.bind_params(book, params, load_inventory(lab))  # fail before any run starts
    except ConfigError as exc:
        _fail(exc)
    state = runbook_flow(name=name, params=params, dry_run=dry_run, yes=yes, lab=str(lab),
                         return_state=True)
    raise typer.Exit(report(state))


def report(state: object) -> int:
    """Print a finished runbook run's steps; 0 completed, 3 cancelled by the operator."""
    from cli.report import print_run
    from tasks.common import failure_of

    cols = ("step", "kind", "status", "seconds", "detail")
    if state.is_cancelled():  # type: ignore[attr-defined]
        console.print(f"[yellow]cancelled by the operator:[/yellow] "
                      f"{state.message}", highlight=False)  # type: ignore[attr-defined]
        return 3
    code = print_run(state, title="runbook", cols=cols, name_col="step", what="runbook")
    if code == 0 and not state.is_completed():  # pragma: no cover - defensive
        exc = failure_of(state)
        console.print(str(exc))
    return code


@runbook_app.command("approve")
def approve(run_id: Annotated[str, typer.Argument(help="The paused runbook flow run id.")],
            reject: Annotated[bool, typer.Option("--reject", help="Reject instead.")] = False,
            comment: Annotated[str, typer.Option(help="Why (kept in the record).")] = ""
            ) -> None:
    """Approve (or --reject) the approval step a runbook run is waiting on."""
    from uuid import UUID

    from prefect.flow_runs import resume_flow_run

    try:
        flow_run_id = UUID(run_id)
    except ValueError:
        err_console.print(f"RUN_ID: {run_id!r} is not a flow run id (a UUID)")
        raise typer.Exit(2) from None
    try:
        resume_flow_run(flow_run_id, run_input={"approve": not reject, "comment": comment})
    except Exception as exc:  # the API says why (not paused, unknown run, ...)
        err_console.print(f"could not resume run {run_id}: {exc}", markup=False)
        raise typer.Exit(1) from None
    console.print(f"run {run_id} {'rejected' if reject else 'approved'}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(runbook_app())
