"""Which site am I, and what can I reach from here? (labkeeper across several machines)

One copy of this deployment per site (`labkeeper serve --sync-schedules` places them on
each site's queue): a run says which worker's host took it (the ``LABKEEPER_SITE`` the
worker was started with, the host name, the network namespace) and which parts of the
inventory answer a TCP connect from there. Read-only; nothing is changed.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from labkeeper.health import tcp_check
from labkeeper.inventory import load_inventory
from labkeeper.inventory.sites import endpoints
from tasks.common import lab_path


def _netns() -> str:
    try:
        return f"net:[{os.stat('/proc/self/ns/net').st_ino}]"
    except OSError:
        return "unknown"


@task(name="probe-endpoints")
def probe_endpoints(targets: list[tuple[str, str, int]], timeout: float) -> list[dict[str, Any]]:
    rows = []
    for what, host, port in targets:
        ok, detail = tcp_check(host, port, timeout)
        rows.append({"part": what, "address": f"{host}:{port}",
                     "reachable": ok, "detail": detail})
    return rows


@flow(name="site-check", log_prints=False, timeout_seconds=600)
def site_check_flow(lab: str | None = None) -> dict[str, Any]:
    """Report where this run executes and what it reaches (each probe waits
    ``settings.tuning.site_check_timeout`` s).

    Args:
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
    """
    log = get_run_logger()
    inv = load_inventory(lab_path(lab))
    timeout = inv.settings.tuning.site_check_timeout
    where = {"site": os.environ.get("LABKEEPER_SITE", "-"), "hostname": socket.gethostname(),
             "netns": _netns(), "pid": os.getpid()}
    rows = probe_endpoints(endpoints(inv), timeout)
    create_table_artifact(key="site-check", table=[{**where, **r} for r in rows],
                          description=f"site {where['site']} on {where['hostname']}")
    log.info("site-check: site %s on %s %s: reachable %s; unreachable %s", where["site"],
             where["hostname"], where["netns"],
             ", ".join(r["part"] for r in rows if r["reachable"]) or "nothing",
             ", ".join(r["part"] for r in rows if not r["reachable"]) or "nothing")
    return {**where, "reachable": sorted(r["part"] for r in rows if r["reachable"])}
