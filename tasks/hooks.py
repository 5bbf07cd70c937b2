"""Flow-run hooks shared by every labkeeper flow: pings and failure notifications.

``@flow(..., **hooks("pg_backup"))`` adds an ``on_running`` hook that sends the
healthchecks ``/start`` ping, an ``on_completion`` hook for the success ping, and
``on_failure``/``on_crashed`` hooks that send the ``/fail`` ping and an Apprise
notification. Hooks never fail a run: delivery problems are logged as warnings.
"""

from __future__ import annotations

import logging
from typing import Any

from labkeeper import notify
from labkeeper.inventory import load_inventory
from labkeeper.secrets import redact
from tasks.common import lab_path

log = logging.getLogger("labkeeper.hooks")


def _inventory(flow_run: Any) -> Any:
    params = getattr(flow_run, "parameters", None) or {}
    try:
        return load_inventory(lab_path(params.get("lab")))
    except Exception as exc:  # a broken inventory is reported by the flow itself
        log.warning("hooks: inventory not readable: %s", exc)
        return None


def _already_told(inv: Any, state: Any) -> bool:
    """The flow already sent the specific message for this failure (a rollback, failed
    drills) to the same subscribers: the generic "run failed" would say it twice."""
    from tasks.common import failure_of

    event = "rollback" if state.name == "RolledBack" else \
        getattr(failure_of(state), "notify_event", None)
    on = getattr(getattr(inv, "notifications", None), "on", ())
    return event is not None and event in on


def hooks(name: str) -> dict[str, list[Any]]:
    """Hook keyword arguments for ``@flow`` for the flow called ``name`` (the key of
    ``notifications.healthchecks.pings``)."""

    def on_running(flow: Any, flow_run: Any, state: Any) -> None:
        inv = _inventory(flow_run)
        if inv is not None:
            notify.ping(inv, name, "start")

    def on_completion(flow: Any, flow_run: Any, state: Any) -> None:
        inv = _inventory(flow_run)
        if inv is not None:
            notify.ping(inv, name, "success")

    def on_failure(flow: Any, flow_run: Any, state: Any) -> None:
        inv = _inventory(flow_run)
        if inv is None:
            return
        message = redact(state.message or state.name)
        notify.ping(inv, name, "fail", body=message)
        if _already_told(inv, state):
            return
        notify.notify(inv, "failure", f"labkeeper: {name} run {flow_run.name} failed",
                      f"{message}\nlab: {inv.lab.name}")

    return {"on_running": [on_running], "on_completion": [on_completion],
            "on_failure": [on_failure], "on_crashed": [on_failure]}
