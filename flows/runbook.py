"""The runbook flow: run one runbook from runbooks/ with its parameters.

Each step is its own task (or, for ``flow`` steps, its own subflow run) with its own
log and state. Approval steps pause the run (``pause_flow_run`` with
``wait_for_input``) until an operator approves or rejects it in the Prefect UI or with
``labkeeper runbook approve RUN_ID``; a rejection ends the run as Cancelled (by the
operator), a timeout fails it. ``dry_run`` changes nothing: it renders every step,
checks every reference and says what would happen.

Each runbook also has a flow of its own (:data:`RUNBOOK_FLOWS`, module attributes named
after the runbooks: ``flows/runbook.py:restore_database``) whose parameters are the
runbook's typed parameters, so its deployment's Run form asks for ``database`` and
``snapshot`` with their descriptions and defaults instead of a JSON object.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from prefect import Flow, flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from prefect.states import Cancelled
from pydantic import Field

from labkeeper import restore
from labkeeper import runbook as rb
from labkeeper import runbook_ops as ops
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.inventory import Inventory, load_inventory
from labkeeper.secrets import redact
from tasks.common import RunFailed, failure_of, lab_path
from tasks.hooks import hooks

DEFAULT_STEP_TIMEOUT = 3600.0


class Approval(RunInput):
    """The operator's answer to an approval step."""

    approve: bool = Field(title="Approve", description=(
        "Tick to let the runbook go on; leave unticked to reject it (the run is cancelled "
        "and the step's compensations run)."))
    comment: str = Field(default="", title="Comment", description=(
        "Why, for the run's record (optional)."))


def approval_text(book: str, step: str, message: str) -> str:
    """What the Resume form of a paused runbook says above its fields."""
    return (f"**Runbook {book}, step {step}: your approval is needed.**\n\n{message}\n\n"
            "Tick *Approve* and submit to go on; submit without it to reject (the run ends "
            "as Cancelled and undoes what the runbook says to undo).")


class RunbookFailed(RunFailed):
    """A runbook step failed (the message says which, and what was already done)."""


def flow_function(name: str) -> Any:
    """The labkeeper flow a ``flow`` step names."""
    if name == "pg_backup":
        from flows.pg_backup import pg_backup_flow as fn
    elif name == "path_backup":
        from flows.path_backup import path_backup_flow as fn
    elif name == "vzdump":
        from flows.vzdump import vzdump_flow as fn
    elif name == "update":
        from flows.update import update_app_flow as fn
    elif name == "provision":
        from flows.provision import provision_flow as fn
    elif name == "drill":
        from flows.dr_drill import dr_drill_flow as fn
    elif name == "restore_database":
        from flows.restore import restore_database_flow as fn
    elif name == "restore_guest":
        from flows.restore import restore_guest_flow as fn
    elif name in rb.models.PITR_FLOWS:
        import flows.pitr

        fn = getattr(flows.pitr, f"{name}_flow")
    else:
        raise ConfigError(f"flow: unknown flow {name!r} (known: {', '.join(rb.FLOWS)})")
    return fn


def flow_arguments(step_id: str, name: str, args: Mapping[str, Any], lab: str
                   ) -> dict[str, Any]:
    """The subflow's arguments: every key must be one of its parameters; ``lab`` is
    passed through."""
    params = inspect.signature(flow_function(name).fn).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise ConfigError(f"step {step_id}: flow {name} has no parameter "
                          f"{', '.join(unknown)} (it takes: {', '.join(params)})")
    out = dict(args)
    if "lab" in params:
        out.setdefault("lab", lab)
    return out


class _Placeholder(dict):  # type: ignore[type-arg]
    """Outputs of a step that a dry run did not run: ``<step.key>``."""

    def __init__(self, step_id: str) -> None:
        super().__init__()
        self.step_id = step_id

    def __contains__(self, key: object) -> bool:
        return True

    def __getitem__(self, key: str) -> str:
        return f"<{self.step_id}.{key}>"


@task(name="runbook-step", timeout_seconds=DEFAULT_STEP_TIMEOUT)
def run_step(lab_file: str, kind: str, spec: dict[str, Any], step_id: str, stamp: str,
             timeout: float, made: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Do one ssh / proxmox / database / check step of a runbook."""
    logger = get_run_logger()
    inv = load_inventory(lab_file)
    lab = ops.Lab(inv)
    try:
        if kind == "ssh":
            detail, outputs = ops.run_ssh(lab, spec, tuple(spec["argv"]), timeout)
        elif kind == "proxmox":
            detail, outputs = ops.run_proxmox(lab, spec)
        elif kind == "database":
            detail, outputs = ops.run_database(lab, spec, stamp=stamp, made=made or {})
        elif kind == "check":
            detail, outputs = ops.run_check(lab, spec)
        else:
            raise ConfigError(f"step {step_id}: kind {kind} does not run as a task")
    finally:
        lab.close()
    logger.info("%s: %s", step_id, detail)
    return {"detail": detail, "outputs": outputs}


def _plan(lab: ops.Lab, step: rb.Step, spec: Any, lab_file: str) -> tuple[str, list[str]]:
    kind = step.kind
    if kind == "flow":
        try:
            args = flow_arguments(step.id, spec["name"], spec.get("with") or {}, lab_file)
        except ConfigError as exc:
            return f"run flow {spec['name']}", [str(exc)]
        args.pop("lab", None)
        return ops.plan_flow(lab, spec["name"], args)
    if kind == "ssh":
        return ops.plan_ssh(lab, spec, tuple(spec["argv"]))
    if kind == "proxmox":
        return ops.plan_proxmox(lab, spec)
    if kind == "database":
        return ops.plan_database(lab, spec)
    if kind == "check":
        return ops.plan_check(lab, spec)
    if kind == "note":
        return f"note: {spec}", []
    return f"pause for approval: {spec['message']}", []


def _flow_outputs(result: Any) -> dict[str, Any]:
    if isinstance(result, dict):
        return result
    return {"rows": result}


@flow(name="runbook", log_prints=False, timeout_seconds=24 * 3600, **hooks("runbook"))
def runbook_flow(name: str, params: dict[str, Any] | None = None, dry_run: bool = False,
                 yes: bool = False, lab: str | None = None) -> Any:
    """Run the runbook ``name`` (a file in runbooks/) with ``params``. Each shipped
    runbook also has a deployment of its own with a form for its parameters.

    Args:
        name: The runbook: a file name in runbooks/ (or $LABKEEPER_RUNBOOKS) without
            .yaml, e.g. restore-database.
        params: The runbook's parameters as JSON, e.g. {"database": "appdb"}
            (labkeeper runbook show NAME lists them).
        dry_run: Check every step and say what it would do, changing nothing.
        yes: Approve every approval step up front (unattended use).
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
    """
    return _run_runbook(rb.find_runbook(name), params or {}, dry_run=dry_run, yes=yes,
                        lab=lab)


def _run_runbook(book: rb.Runbook, params: Mapping[str, Any], *, dry_run: bool, yes: bool,
                 lab: str | None) -> Any:
    """The body of every runbook flow: bind the parameters, run the steps, record them."""
    logger = get_run_logger()
    lab_file = lab_path(lab)
    inv = load_inventory(lab_file)
    name = book.name
    values = rb.bind_params(book, params, inv)
    ctx_run = get_run_context()
    run_id = str(ctx_run.flow_run.id) if getattr(ctx_run, "flow_run", None) else "local"
    stamp = restore.stamp()
    ctx = rb.context(book, values, inv, run_id=run_id, stamp=stamp)
    logger.info("runbook %s%s with %s", name, " (dry run)" if dry_run else "",
                ", ".join(f"{k}={v!r}" for k, v in values.items()) or "no parameters")
    runner = _Runner(book, inv, lab_file, ctx, stamp=stamp, dry_run=dry_run, yes=yes,
                     poll=inv.settings.tuning.approval_poll)
    started = time.monotonic()
    outcome, error = runner.run()
    elapsed = time.monotonic() - started
    create_markdown_artifact(
        key=f"runbook-{name}", description=f"runbook {name}: {outcome}",
        markdown=rb.record_markdown(book, values, runner.records, outcome=outcome,
                                    dry_run=dry_run, elapsed=elapsed))
    create_table_artifact(key=f"runbook-{name}-steps", table=[r.row() for r in runner.records],
                          description=f"runbook {name}: {outcome}")
    rows = [r.row() for r in runner.records]
    if outcome == "rejected":
        return Cancelled(message=f"cancelled by operator: {error}", data=rows)
    if error is not None:
        raise RunbookFailed(error, rows)
    return rows


class _Runner:
    def __init__(self, book: rb.Runbook, inv: Inventory, lab_file: str, ctx: dict[str, Any],
                 *, stamp: str, dry_run: bool, yes: bool, poll: int) -> None:
        self.book, self.inv, self.lab_file, self.ctx = book, inv, lab_file, ctx
        self.stamp, self.dry_run, self.yes, self.poll = stamp, dry_run, yes, poll
        self.records: list[rb.StepRecord] = []
        self.made: dict[str, list[str]] = {}
        """Databases this run created (restored copies, set-aside originals), by database:
        the only ones its swap and drop steps accept."""
        self.logger = get_run_logger()
        self.lab = ops.Lab(inv) if dry_run else None

    def run(self) -> tuple[str, str | None]:
        failures: list[str] = []
        try:
            for step in self.book.steps:
                rec = self._step(step)
                if rec.status == "rejected":
                    if isinstance(step.on_failure, rb.Compensate):
                        for c in step.on_failure.compensate:
                            self._step(self.book.compensation(c), compensation=True)
                    return "rejected", rec.detail
                if rec.status != "failed":
                    continue
                if self.dry_run:
                    failures.append(f"{step.id}: {rec.detail}")
                    continue
                policy = step.on_failure
                if policy == "continue":
                    self.logger.warning("step %s failed; continuing (on_failure: continue)",
                                        step.id)
                    continue
                done = [r.id for r in self.records if r.status == "ok" and not r.compensation]
                comp = ""
                if isinstance(policy, rb.Compensate):
                    results = [self._step(self.book.compensation(c), compensation=True)
                               for c in policy.compensate]
                    comp = "; compensation: " + ", ".join(f"{r.id} {r.status}" for r in results)
                return "failed", (f"step {step.id} failed: {rec.detail}; already done: "
                                  f"{', '.join(done) or 'nothing'}{comp}")
        finally:
            if self.lab is not None:
                self.lab.close()
        if failures:
            return "dry run found problems", (f"dry run of {self.book.name}: "
                                              f"{len(failures)} step(s) would fail: "
                                              + " | ".join(failures))
        failed = [r.id for r in self.records if r.status == "failed"]
        if failed:
            return f"completed; {', '.join(failed)} failed (on_failure: continue)", None
        return "planned" if self.dry_run else "completed", None

    # -- one step
    def _step(self, step: rb.Step, *, compensation: bool = False) -> rb.StepRecord:
        rec = rb.StepRecord(step.id, step.kind, "", compensation=compensation)
        self.records.append(rec)
        started = time.monotonic()
        try:
            rec.title = str(rb.render(step.title, self.ctx)) if step.title else \
                rb.default_title(step)
            skip = None
            if step.when is not None and not rb.truthy(rb.render(step.when, self.ctx)):
                skip = f"when {step.when} is false"
            elif step.unless is not None and rb.truthy(rb.render(step.unless, self.ctx)):
                skip = f"unless {step.unless} is true"
            if skip:
                rec.status, rec.detail = "skipped", skip
                self.ctx["steps"][step.id] = {}
                return rec
            spec = self._spec(step)
            if self.dry_run:
                assert self.lab is not None
                what, problems = _plan(self.lab, step, spec, self.lab_file)
                rec.status = "failed" if problems else "planned"
                rec.detail = "; ".join(problems) if problems else what
                self.ctx["steps"][step.id] = _Placeholder(step.id)
                log = self.logger.error if problems else self.logger.info
                log("[dry run] %s: %s", step.id, redact(rec.detail))
                return rec
            self._execute(step, spec, rec)
        except LabkeeperError as exc:
            rec.status, rec.detail = "failed", redact(str(exc))
        finally:
            rec.seconds = time.monotonic() - started
            rec.detail = redact(rec.detail)
        if rec.status == "failed":
            self.logger.error("step %s failed: %s", step.id, rec.detail)
        self.ctx["steps"][step.id] = rec.outputs
        return rec

    def _spec(self, step: rb.Step) -> Any:
        if step.kind == "note":
            return rb.render(step.note, self.ctx)
        raw = step.spec.model_dump(by_alias=True)
        if step.kind == "ssh":
            raw["argv"] = list(rb.render_argv(step.ssh.argv, self.ctx))
            raw["host"] = rb.render(raw["host"], self.ctx)
            return raw
        return rb.render(raw, self.ctx)

    def _execute(self, step: rb.Step, spec: Any, rec: rb.StepRecord) -> None:
        kind = step.kind
        if kind == "note":
            self.logger.info("NOTE (%s): %s", step.id, spec)
            rec.status, rec.detail = "ok", str(spec)
            return
        if kind == "approval":
            self._approval(spec, rec)
            return
        if kind == "flow":
            args = flow_arguments(step.id, spec["name"], spec.get("with") or {}, self.lab_file)
            fn = flow_function(spec["name"])
            state = fn(**args, return_state=True)
            if state.is_completed():
                rec.outputs = _flow_outputs(state.result())
                if spec["name"] == "restore_database":
                    self._made(str(args["database"]), rec.outputs.get("restored"))
                rec.status = "ok"
                rec.detail = f"flow {spec['name']} completed"
            else:
                exc = failure_of(state)
                rec.status = "failed"
                rec.detail = redact(f"flow {spec['name']} {state.name.lower()}: "
                                    f"{exc if exc else state.message}")
            return
        timeout = float(step.timeout or DEFAULT_STEP_TIMEOUT)
        task_fn = run_step.with_options(name=f"runbook-{step.kind}", timeout_seconds=timeout,
                                        task_run_name=step.id)
        state = task_fn(self.lab_file, kind, spec, step.id, self.stamp, timeout,
                        made=self.made if kind == "database" else None, return_state=True)
        if state.is_completed():
            out = state.result()
            rec.status, rec.detail, rec.outputs = "ok", out["detail"], out["outputs"]
            if kind == "database":
                self._made(str(spec["database"]), out["outputs"].get("aside"))
        else:
            exc = failure_of(state)
            rec.status = "failed"
            rec.detail = redact(str(exc) if exc else (state.message or state.name))

    def _made(self, database: str, name: Any) -> None:
        if name:
            self.made.setdefault(database, []).append(str(name))

    def _approval(self, spec: Mapping[str, Any], rec: rb.StepRecord) -> None:
        message = str(spec["message"])
        if self.yes:
            rec.status, rec.detail = "ok", f"approved up front (--yes): {message}"
            self.logger.info("approval %s: approved up front (yes): %s", rec.id, message)
            return
        run_id = self.ctx["run"]["id"]
        self.logger.warning("WAITING FOR APPROVAL (%s): %s — approve or reject in the Prefect "
                            "UI, or: labkeeper runbook approve %s [--reject]",
                            rec.id, message, run_id)
        try:
            answer = pause_flow_run(wait_for_input=Approval.with_initial_data(
                description=approval_text(self.book.name, rec.id, message), approve=False),
                timeout=int(spec.get("timeout") or 3600), poll_interval=self.poll,
                key=f"approval-{rec.id}")
        except FlowPauseTimeout:
            rec.status = "failed"
            rec.detail = f"no approval within {spec.get('timeout')} s: {message}"
            return
        who = f" ({answer.comment})" if answer.comment else ""
        if answer.approve:
            rec.status, rec.detail = "ok", f"approved{who}: {message}"
        else:
            rec.status, rec.detail = "rejected", f"rejected by the operator{who}: {message}"


# -- one flow per runbook: the runbook's own parameters on the Run form ----------------

RUN_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "dry_run": (bool, False, "Check every step and say what it would do, changing nothing."),
    "yes": (bool, False, "Approve every approval step up front (unattended use)."),
    "lab": (str | None, None, "Inventory file on the machine that runs the job (empty: "
                              "$LABKEEPER_LAB, else lab.yaml)."),
}
"""The parameters every runbook flow takes besides the runbook's own."""


def _param_type(p: rb.Param) -> Any:
    one: Any = {"int": int, "bool": bool}.get(p.type, str)
    if p.choices:
        one = Literal[tuple(p.choices)]
    return list[one] if p.multiple else one


def _param_help(p: rb.Param) -> str:
    kind = p.type.replace("_", " ")
    return " ".join(p.description.split()) or f"A {kind}{' (several)' if p.multiple else ''}."


def runbook_signature(book: rb.Runbook) -> inspect.Signature:
    """The runbook's parameters (required ones without a default), then dry_run, yes
    and lab; all keyword-only."""
    kw = inspect.Parameter.KEYWORD_ONLY
    params = [inspect.Parameter(n, kw, annotation=_param_type(p),
                                default=inspect.Parameter.empty if p.required else p.default)
              for n, p in book.params.items()]
    params += [inspect.Parameter(n, kw, annotation=t, default=d)
               for n, (t, d, _) in RUN_OPTIONS.items()]
    return inspect.Signature(params, return_annotation=Any)


def runbook_docstring(book: rb.Runbook) -> str:
    """The runbook's description and a Google-style ``Args:`` section (Prefect turns it
    into the parameters' descriptions on the Run form)."""
    helps = {n: _param_help(p) for n, p in book.params.items()}
    helps.update({n: h for n, (_, _, h) in RUN_OPTIONS.items()})
    lines = [" ".join(book.description.split()) or f"Runbook {book.name}.", "", "Args:"]
    lines += [f"    {n}: {h}" for n, h in helps.items()]
    return "\n".join(lines)


def runbook_as_flow(path: Path) -> Flow[..., Any]:
    """A flow named ``runbook`` that runs the runbook in ``path``, its parameters those
    of the runbook (read again from ``path`` when it runs)."""
    book = rb.load_runbook(path)
    clash = sorted(set(book.params) & set(RUN_OPTIONS))
    if clash:
        raise ConfigError(f"runbook {book.name}: parameter {', '.join(clash)} is taken "
                          "by the runbook flow itself")

    def run(**given: Any) -> Any:
        opts = {n: given.pop(n, default) for n, (_, default, _) in RUN_OPTIONS.items()}
        return _run_runbook(rb.load_runbook(path), given, **opts)

    run.__signature__ = runbook_signature(book)  # type: ignore[attr-defined]
    run.runbook_path = path  # type: ignore[attr-defined]  # for deployments/forms.py
    run.__doc__ = runbook_docstring(book)
    run.__name__ = run.__qualname__ = book.name.replace("-", "_")
    return flow(name="runbook", log_prints=False, timeout_seconds=24 * 3600,
                description=" ".join(book.description.split()) or None,
                **hooks("runbook"))(run)


def _runbook_flows() -> dict[str, Flow[..., Any]]:
    """The shipped runbooks' flows, and those of ``$LABKEEPER_RUNBOOKS`` (which win on
    a name both have). An invalid runbook gets none (``labkeeper runbook list`` says
    why)."""
    files = rb.runbook_files(rb.RUNBOOK_DIR)
    files.update(rb.runbook_files())
    out: dict[str, Flow[..., Any]] = {}
    for name, path in files.items():
        try:
            out[name] = runbook_as_flow(path)
        except ConfigError:
            continue
    return out


RUNBOOK_FLOWS = _runbook_flows()
"""Runbook name -> its flow; each is also a module attribute (``-`` as ``_``), the
entrypoint of its deployment (``flows/runbook.py:restore_database``)."""
globals().update({name.replace("-", "_"): fl for name, fl in RUNBOOK_FLOWS.items()
                  if name.replace("-", "_").isidentifier()
                  and name.replace("-", "_") not in globals()})
