"""What runbook steps do to the lab (ssh, proxmox, database, check), and what a dry run
checks of each step's references without changing anything.

Each ``run_*`` takes a step spec already rendered (``labkeeper.runbook.render``) and
returns ``(detail, outputs)``; failures raise labkeeper errors. Each ``plan_*``
returns ``(what would happen, problems)``.
"""

from __future__ import annotations

import logging
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from labkeeper import drill, postgres, restore, update
from labkeeper import health as hc
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, LabkeeperError, PermanentError
from labkeeper.inventory import Inventory, SmokeQuery
from labkeeper.runbook import FLOWS, start_order
from labkeeper.ssh import SshPool, SshTarget

logger = logging.getLogger(__name__)

Outputs = dict[str, Any]


class StepFailed(PermanentError):
    """A runbook step did not do what it declares."""


def _names(value: Any) -> list[str]:
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


class Lab:
    """The lab a runbook works on: inventory, a lazily opened Proxmox API, an SSH pool."""

    def __init__(self, inv: Inventory, *, api: Any = None) -> None:
        self.inv = inv
        self._api = api
        self.pool = SshPool()

    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = px.connect_lab(self.inv.proxmox)
        return self._api

    @property
    def task_timeout(self) -> float:
        return float(self.inv.proxmox.task_timeout) if self.inv.proxmox else 3600.0

    def close(self) -> None:
        self.pool.close()

    def wait(self, upid: Any, timeout: float | None = None) -> px.TaskResult:
        return px.wait_for_task(self.api, upid, timeout=timeout or self.task_timeout)

    def where(self, name: str) -> tuple[Any, px.Guest | None]:
        guest = self.inv.guest(name)
        return guest, px.find_guest(self.api, guest.vmid)


# ============================================================================ ssh


def run_ssh(lab: Lab, spec: Mapping[str, Any], argv: Sequence[str], timeout: float
            ) -> tuple[str, Outputs]:
    target = SshTarget.from_spec(lab.inv.ssh_target(str(spec["host"])))
    res = lab.pool.get(target).run(argv, timeout=timeout, check=False,
                                   on_stdout_line=lambda t: logger.info("%s| %s", spec["host"], t))
    expect = list(spec.get("expect_exit") or [0])
    out = {"stdout": res.stdout.strip(), "returncode": res.returncode}
    if res.returncode not in expect:
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise StepFailed(f"{argv[0]} on {spec['host']} exited {res.returncode} (expected "
                         f"{', '.join(map(str, expect))}): {' | '.join(tail)}")
    return f"exit {res.returncode} on {spec['host']}", out


def plan_ssh(lab: Lab, spec: Mapping[str, Any], argv: Sequence[str]) -> tuple[str, list[str]]:
    problems = []
    try:
        lab.inv.ssh_target(str(spec["host"]))
    except ConfigError as exc:
        problems.append(str(exc))
    return f"on {spec['host']}: {shlex.join(argv)}", problems


# ============================================================================ proxmox


def _guests_of(lab: Lab, spec: Mapping[str, Any]) -> list[str]:
    if spec.get("app"):
        return [lab.inv.app(str(spec["app"])).guest]
    return _names(spec["guest"])


_POWER_OPS = ("start", "shutdown", "stop")


def run_proxmox(lab: Lab, spec: Mapping[str, Any]) -> tuple[str, Outputs]:
    op = spec["op"]
    names = _guests_of(lab, spec)
    if op in _POWER_OPS:
        return _power(lab, op, names)
    if len(names) != 1:
        raise ConfigError(f"proxmox {op}: one guest, not {len(names)}")
    name = names[0]
    guest, found = lab.where(name)
    if found is None:
        raise StepFailed(f"guest {name} (VMID {guest.vmid}) does not exist in Proxmox")
    if op == "destroy":
        raise ConfigError("proxmox destroy is only for guests a runbook created "
                          "(use restore_guest to a new VMID and destroy it by vmid)")
    one = _ONE_GUEST_OPS.get(op)
    if one is None:
        raise ConfigError(f"proxmox op {op!r} unknown")
    return one(lab, spec, name, guest, found)


def _power(lab: Lab, op: str, names: list[str]) -> tuple[str, Outputs]:
    """Start guests in dependency order; shut down or stop them in the reverse order."""
    order = start_order(lab.inv, names)
    if op != "start":
        order.reverse()
    want = "running" if op == "start" else "stopped"
    action = {"start": px.start_guest, "stop": px.stop_guest,
              "shutdown": px.shutdown_guest}[op]
    done = []
    for n in order:
        guest, found = lab.where(n)
        if found is None:
            raise StepFailed(f"guest {n} (VMID {guest.vmid}) does not exist in Proxmox")
        if found.status == want:
            done.append(f"{n} already {want}")
            continue
        logger.info("%s %s (VMID %s on %s)", op, n, guest.vmid, found.node)
        lab.wait(action(lab.api, found.node, guest.vmid, guest.type))
        done.append(f"{n} {want}")
    return "; ".join(done), {"order": order}


def _snapshot(lab: Lab, spec: Mapping[str, Any], name: str, guest: Any, found: px.Guest
              ) -> tuple[str, Outputs]:
    snap = str(spec["snapshot"])
    lab.wait(px.create_snapshot(lab.api, found.node, guest.vmid, guest.type, snap))
    return f"snapshot {snap} of {name}", {"snapshot": snap}


def _rollback(lab: Lab, spec: Mapping[str, Any], name: str, guest: Any, found: px.Guest
              ) -> tuple[str, Outputs]:
    node = found.node
    snap = resolve_snapshot(lab, name, str(spec["snapshot"]))
    lab.wait(px.rollback_snapshot(lab.api, node, guest.vmid, guest.type, snap))
    status = px.guest_status(lab.api, node, guest.vmid, guest.type)
    if status.status != "running":
        lab.wait(px.start_guest(lab.api, node, guest.vmid, guest.type))
    return f"{name} rolled back to {snap} and running", {"snapshot": snap}


def _tag(lab: Lab, spec: Mapping[str, Any], name: str, guest: Any, found: px.Guest
         ) -> tuple[str, Outputs]:
    tag = str(spec["tag"])
    if tag in found.tags:
        return f"{name} already tagged {tag}", {"tags": list(found.tags)}
    tags = [*found.tags, tag]
    px.configure(lab.api, found.node, guest.vmid, guest.type, {"tags": px.format_tags(tags)})
    return f"{name} tagged {tag}", {"tags": tags}


_ONE_GUEST_OPS: dict[str, Callable[..., tuple[str, Outputs]]] = {
    "snapshot": _snapshot, "rollback": _rollback, "tag": _tag,
}


def resolve_snapshot(lab: Lab, guest_name: str, wanted: str) -> str:
    guest, found = lab.where(guest_name)
    node = found.node if found is not None else guest.node
    snaps = [s for s in px.list_snapshots(lab.api, node, guest.vmid, guest.type)
             if s.name != "current"]
    if wanted == "latest-pre-update":
        pre = [s for s in snaps if update.is_pre_update(s.name)]
        if not pre:
            raise StepFailed(f"guest {guest_name} has no pre-update snapshot "
                             f"(snapshots: {', '.join(s.name for s in snaps) or 'none'})")
        return max(pre, key=lambda s: (s.snaptime or 0, s.name)).name
    if wanted not in {s.name for s in snaps}:
        raise StepFailed(f"guest {guest_name} has no snapshot {wanted!r} (snapshots: "
                         f"{', '.join(s.name for s in snaps) or 'none'})")
    return wanted


def plan_proxmox(lab: Lab, spec: Mapping[str, Any]) -> tuple[str, list[str]]:
    problems: list[str] = []
    try:
        names = _guests_of(lab, spec)
    except ConfigError as exc:
        return f"proxmox {spec['op']}", [str(exc)]
    for n in names:
        try:
            guest, found = lab.where(n)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if found is None:
            problems.append(f"guest {n} (VMID {guest.vmid}) does not exist in Proxmox")
    op = spec["op"]
    what = f"proxmox {op} {', '.join(names)}"
    if op in ("start", "shutdown", "stop") and not problems:
        try:
            order = start_order(lab.inv, names)
            what = f"proxmox {op} in order: " + ", ".join(order if op == "start"
                                                          else list(reversed(order)))
        except ConfigError as exc:
            problems.append(str(exc))
    if op == "rollback" and not problems:
        try:
            what += f" to snapshot {resolve_snapshot(lab, names[0], str(spec['snapshot']))}"
        except LabkeeperError as exc:
            problems.append(str(exc))
    if op == "tag":
        what += f" (add tag {spec['tag']})"
    if op == "destroy":
        problems.append("proxmox destroy is not allowed in runbooks")
    return what, problems


# ============================================================================ database


def run_database(lab: Lab, spec: Mapping[str, Any], *, stamp: str,
                 made: restore.Made) -> tuple[str, Outputs]:
    """Swap or drop; ``made``: the databases this run created (only those are accepted)."""
    name = str(spec["database"])
    if spec["op"] == "swap":
        aside = restore.swap_database(lab.inv, name, str(spec["restored"]), made=made,
                                      when=stamp)
        return (f"{spec['restored']} now serves as {lab.inv.database(name).effective_dbname}; "
                f"the previous one kept as {aside}"), {"aside": aside}
    target = str(spec["name"])
    present = restore.drop_database(lab.inv, name, target, made=made)
    return (f"dropped {target}" if present else f"{target} was not there"), {}


def plan_database(lab: Lab, spec: Mapping[str, Any]) -> tuple[str, list[str]]:
    problems = []
    try:
        db = lab.inv.database(str(spec["database"]))
    except ConfigError as exc:
        return f"database {spec['op']}", [str(exc)]
    target = str(spec["restored"] if spec["op"] == "swap" else spec["name"])
    if not target.startswith("<"):  # a dry run shows this run's outputs as <step.key>
        problems.append(f"{spec['op']} {target!r}: not a copy this run makes (only a "
                        "restore_database step's output, e.g. {{ steps.restore.restored }}, "
                        "is accepted)")
    if spec["op"] == "swap":
        what = (f"rename {db.effective_dbname} aside (…_before_<stamp>) and "
                f"{spec['restored']} to {db.effective_dbname}")
    else:
        what = f"drop {spec['name']}"
        if not str(spec["name"]).startswith("<") and not restore.is_labkeeper_copy(
                str(spec["name"])):
            problems.append(f"drop {spec['name']!r}: not a database labkeeper restored")
    return what, problems


# ============================================================================ checks


def _apps(lab: Lab, value: Any) -> list[str]:
    names = _names(value)
    if names == ["all"]:
        return [a.name for a in lab.inv.apps]
    return names


def run_check(lab: Lab, spec: Mapping[str, Any], *, sleep: Callable[[float], None] = time.sleep
              ) -> tuple[str, Outputs]:
    if spec.get("health") is not None:
        details = []
        for name in _apps(lab, spec["health"]):
            app = lab.inv.app(name)

            def one_round(app: Any = app) -> list[hc.ProbeResult]:
                spec_ = lab.inv.ssh_target(app.guest) if app.guest in lab.inv.ssh_targets() \
                    else None
                factory = (lambda: lab.pool.get(SshTarget.from_spec(spec_))) if spec_ else None
                return hc.run_round(app, inv=lab.inv, ssh=factory)

            outcome = hc.run_gate(one_round, app.gate, sleep=sleep)
            if not outcome.passed:
                raise StepFailed(f"app {name} unhealthy: {outcome.reason}")
            details.append(f"{name} healthy ({outcome.reason})")
        return "; ".join(details) or "no apps", {}
    if spec.get("sql") is not None:
        q = spec["sql"]
        db = lab.inv.database(str(q["database"]))
        from labkeeper.pg_backup import conn_for

        smoke = SmokeQuery(sql=q["query"], min=q.get("min"), max=q.get("max"),
                           equals=q.get("equals"))
        ok, detail = drill.judge_smoke(smoke, postgres.query(conn_for(lab.inv, db), smoke.sql,
                                                             timeout=300))
        if not ok:
            raise StepFailed(f"{db.name}: {smoke.sql!r} {detail}")
        return f"{db.name}: {detail}", {}
    out = []
    for n in _names(spec["guest_running"]):
        guest, found = lab.where(n)
        if found is None:
            raise StepFailed(f"guest {n} does not exist in Proxmox")
        status = px.guest_status(lab.api, found.node, guest.vmid, guest.type)
        if status.status != "running":
            raise StepFailed(f"guest {n} is {status.status}, not running")
        out.append(f"{n} running")
    return "; ".join(out), {}


def plan_check(lab: Lab, spec: Mapping[str, Any]) -> tuple[str, list[str]]:
    problems: list[str] = []
    try:
        if spec.get("health") is not None:
            names = _apps(lab, spec["health"])
            for n in names:
                lab.inv.app(n)
            return f"health probes of {', '.join(names) or 'no apps'} must pass", problems
        if spec.get("sql") is not None:
            lab.inv.database(str(spec["sql"]["database"]))
            return f"{spec['sql']['database']}: {spec['sql']['query']!r}", problems
        names = _names(spec["guest_running"])
        for n in names:
            lab.inv.guest(n)
        return f"{', '.join(names)} running", problems
    except ConfigError as exc:
        return "check", [str(exc)]


# ============================================================================ flows (dry run)


def plan_flow(lab: Lab, name: str, args: Mapping[str, Any]) -> tuple[str, list[str]]:
    """What a flow step would do, with its references checked (read-only)."""
    if name not in FLOWS:
        return f"flow {name}", [f"unknown flow {name!r}"]
    inv = lab.inv
    problems: list[str] = []
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
    what = f"run flow {name}({shown})"
    try:
        if name == "pg_backup":
            for d in args.get("databases") or []:
                inv.database(d)
        elif name == "update":
            for a in args.get("apps") or []:
                inv.app(a)
        elif name == "vzdump" and args.get("job"):
            inv.vzdump_job(str(args["job"]))
        elif name == "path_backup" and args.get("host"):
            inv.ssh_target(str(args["host"]))
        elif name == "restore_database":
            db = inv.database(str(args["database"]))
            _repo, backup = restore.pick_backup(inv, db, str(args.get("snapshot") or "latest"))
            what += f": backup {backup.backup_id} (snapshot {backup.dump.short_id})"
        elif name == "restore_guest":
            vol = restore.pick_archive(lab.api, inv, str(args["guest"]),
                                       str(args.get("archive") or "latest"))
            what += f": archive {vol.volid}"
        elif name == "pitr_restore_copy":
            from labkeeper.pitr import copy as pitr_copy

            what = pitr_copy.plan_live(inv, str(args["server"]), str(args["database"]),
                                       str(args["to"]))
    except (LabkeeperError, KeyError) as exc:
        problems.append(str(exc) if not isinstance(exc, KeyError) else f"missing {exc}")
    return what, problems
