"""A served deployment whose run reports how its process started (test_served_runs.py).

``python -c "from tests.integration.served_probe import main; main()"`` serves one
deployment, ``probe/probe``, through deployments/serve.py's ``run_served`` (what
`labkeeper serve` uses), so the flow's module is an importable one and the run starts
as a served labkeeper run starts.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from prefect import flow


@flow(name="probe")
def probe(out: str, hold: float = 0.0) -> str:
    """Write this process's pid, its parent's pid, whether labkeeper's flows were
    imported before the run started, and an environment value; then hold (seconds)."""
    from prefect import flow_engine

    from flows import heartbeat

    Path(out).write_text(json.dumps({
        "pid": os.getpid(), "ppid": os.getppid(),
        "preloaded": "flows.dr_drill" in sys.modules,
        "heartbeat": flow_engine._send_heartbeats is heartbeat.send_heartbeats,
        "marker": os.environ.get("LK_PROBE_MARKER"),
        "frozen": gc.get_freeze_count(),
    }))
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return "done"


def main() -> None:
    from deployments.serve import run_served

    run_served([probe.to_deployment(name="probe")])
