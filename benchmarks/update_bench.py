"""A Compose app update on the real engine: labkeeper's steps vs the bare commands.

Starts its own lab (nothing shared with the tests): Debian's dockerd on a private
socket, a loopback registry with the lab app's images (busybox httpd, version 1 and
2), a local sshd (labkeeper reaches the "guest" over SSH, as in production) and,
unless ``--no-flow``, a Prefect server. The stack: one service, host networking, a
1 s container healthcheck, image ``REGISTRY/labapp:bench``.

Each round first puts the stack back on version 1, then makes the registry offer
version 2 (the engine's local tag is dropped, so the pull really fetches), and runs,
alternating:

* **bare**: ``docker compose pull && docker compose up -d`` (local processes), then
  the time until ``/health`` answers ``ok`` ("healthy");
* **core**: labkeeper's steps called directly over SSH, as the flow runs them:
  record versions (ps, config, image inspect), fetch (pull + compare), protect
  (``compose-images``: check the old image, keep-tag it), update (``up -d``),
  record what runs, the gate (HTTP + container probes, 2 healthy rounds 0.5 s apart),
  cleanup;
* **flow**: the whole ``update-app`` flow run (Prefect tasks, journal, artifacts),
  timings per step from its result.

Reported (medians over ``--rounds``): seconds per step, and the overhead beyond the
gate's own waiting: ``total - bare(pull+up) - gate``.

Usage: ``.venv/bin/python benchmarks/update_bench.py [--rounds 5] [--no-flow]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labkeeper import process
from labkeeper import update as core
from labkeeper.inventory import load_inventory
from labkeeper.locallab.docker import LocalDocker, LocalRegistry
from labkeeper.locallab.images import AppImages, build_app_images
from labkeeper.locallab.ports import free_port
from labkeeper.locallab.sshd import LocalSshd

GATE = {"initial_delay": 0, "interval": 0.5, "deadline": 60, "successes": 2}


def compose_file(image: str, port: int) -> str:
    check = {"test": ["CMD-SHELL", f"wget -q -O /dev/null http://127.0.0.1:{port}/health"],
             "interval": "1s", "timeout": "3s", "retries": 2}
    return json.dumps({"services": {"web": {
        "image": image, "network_mode": "host", "environment": {"PORT": str(port)},
        "healthcheck": check, "stop_grace_period": "3s"}}}, indent=2)


def inventory(work: Path, sshd: LocalSshd, stack: Path, engine: LocalDocker,
              port: int) -> Path:
    import yaml

    inv = {
        "version": 1, "lab": {"name": "update-bench"},
        "settings": {"state_dir": str(work / "state")},
        "proxmox": {  # declared for the guest; never contacted (compose-images)
            "host": "127.0.0.1", "port": free_port(), "token_id": "bench@pve!x",
            "token_secret": "env:LABKEEPER_BENCH_UNUSED", "nodes": [{"name": "pve1"}],
            "storages": [{"name": "local", "type": "dir", "content": ["vztmpl", "backup"]},
                         {"name": "local-lvm", "type": "lvmthin",
                          "content": ["images", "rootdir"]}]},
        "ssh": {"user": sshd.user, "key": sshd.user_key_ref,
                "known_hosts": str(sshd.known_hosts_path), "connect_timeout": 5},
        "guests": [{"name": "g", "vmid": 900, "type": "lxc", "node": "pve1",
                    "template": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
                    "resources": {"cores": 1, "memory_mb": 512, "disk_gb": 4,
                                  "storage": "local-lvm"},
                    "ssh": {"address": "127.0.0.1", "port": sshd.port}}],
        "apps": [{"name": "bench", "guest": "g", "strategy": "compose",
                  "rollback": "compose-images", "keep_snapshots": 0,
                  "compose": {"dir": str(stack), "project": "bench",
                              "docker_host": engine.host},
                  "health": [{"name": "health page",
                              "http": {"url": f"http://127.0.0.1:{port}/health",
                                       "body_contains": "ok"}},
                             {"name": "containers", "container": {}}],
                  "gate": GATE}],
    }
    path = work / "lab.yaml"
    path.write_text(yaml.safe_dump(inv, sort_keys=False))
    return path


class Bench:
    def __init__(self, work: Path, engine: LocalDocker, images: AppImages, lab: Path,
                 stack: Path, port: int) -> None:
        self.work, self.engine, self.images, self.lab = work, engine, images, lab
        self.stack, self.port = stack, port
        self.compose = (engine.client, "--host", engine.host, "compose",
                        "--project-directory", str(stack), "-f", f"{stack}/compose.yaml",
                        "-p", "bench")

    def run(self, *args: str) -> float:
        t = time.monotonic()
        process.run((*self.compose, *args), timeout=300)
        return time.monotonic() - t

    def healthy_after(self, start: float) -> float:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health",
                                            timeout=2) as r:
                    if b"ok" in r.read():
                        v = urllib.request.urlopen(
                            f"http://127.0.0.1:{self.port}/version", timeout=2).read()
                        if v.strip() == b"2":
                            return time.monotonic() - start
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError("the stack never became healthy on version 2")

    def reset(self) -> None:
        """Back on version 1, and the registry offers version 2 (not pulled yet)."""
        self.images.point("bench", "1")
        self.engine.docker("tag", self.images.ids["1"], self.images.ref("bench"))
        self.run("up", "-d", "--wait")
        running = process.run((*self.compose, "ps", "--format", "{{.Labels}}"),
                              timeout=60).stdout
        assert self.images.ids["1"] in running, "the stack is not back on version 1"
        core.clear_pin(load_inventory(self.lab), "bench")
        self.images.point("bench", "2")
        self.images.forget("bench")

    def bare(self) -> dict[str, float]:
        self.reset()
        t0 = time.monotonic()
        pull = self.run("pull", "--quiet")
        up = self.run("up", "-d")
        return {"pull": pull, "up": up, "pull+up": pull + up,
                "until healthy": self.healthy_after(t0)}

    def core(self) -> dict[str, float]:
        self.reset()
        inv = load_inventory(self.lab)
        out: dict[str, float] = {}
        t0 = time.monotonic()
        lap = t0
        with core.Session(inv, "bench") as s:
            def mark(step: str) -> None:
                nonlocal lap
                now = time.monotonic()
                out[step] = now - lap
                lap = now

            versions = core.record_versions(s)
            mark("versions")
            offer = core.fetch(s, versions)
            assert offer.new, "the registry offered nothing new"
            mark("fetch (pull)")
            prot = core.protect(s, core.new_run_id(), versions)
            mark("protect")
            core.run_update(s)
            mark("update (up -d)")
            core.compose_versions(s, refs=versions.refs)
            mark("attempted")
            outcome = core.gate(s)
            assert outcome.passed, outcome.reason
            mark("gate")
            core.cleanup(s)
            mark("cleanup")
        out["total"] = time.monotonic() - t0
        assert prot.images
        return out

    def flow(self) -> dict[str, float]:
        from flows.update import update_app_flow

        self.reset()
        t0 = time.monotonic()
        state = update_app_flow(apps=["bench"], lab=str(self.lab), return_state=True)
        wall = time.monotonic() - t0
        rows = state.result()
        assert state.is_completed() and rows[0]["status"] == "updated", state.message
        return {"flow wall": wall}


def median_table(samples: list[dict[str, float]]) -> dict[str, float]:
    keys = list(samples[0])
    return {k: statistics.median(s[k] for s in samples) for k in keys}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-flow", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="update-bench-"))
    port = free_port()
    with LocalDocker(work / "docker") as engine, LocalRegistry(work / "reg") as reg, \
            LocalSshd(work / "sshd") as sshd:
        images = build_app_images(engine, reg, workdir=work / "img", versions=("1", "2"))
        images.point("bench", "1")
        stack = work / "stack"
        stack.mkdir()
        (stack / "compose.yaml").write_text(compose_file(images.ref("bench"), port))
        lab = inventory(work, sshd, stack, engine, port)
        bench = Bench(work, engine, images, lab, stack, port)
        bench.run("up", "-d", "--wait")
        results: dict[str, list[dict[str, float]]] = {"bare": [], "core": [], "flow": []}
        server: Any = None
        if not args.no_flow:
            from prefect.settings import (
                PREFECT_API_URL,
                PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
                temporary_settings,
            )

            from labkeeper.locallab.prefect_server import LocalPrefectServer

            server = LocalPrefectServer(work / "prefect", port=free_port())
            server.start(timeout=120)
            ctx = temporary_settings({PREFECT_API_URL: server.api_url,
                                      PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
            ctx.__enter__()
        try:
            for _ in range(args.rounds):
                results["bare"].append(bench.bare())
                results["core"].append(bench.core())
                if server is not None:
                    results["flow"].append(bench.flow())
        finally:
            bench.run("down", "-t", "1")
            if server is not None:
                server.stop()
    shutil.rmtree(work, ignore_errors=True)
    bare, ours = median_table(results["bare"]), median_table(results["core"])
    print(f"medians over {args.rounds} round(s), seconds")
    for name, table in (("bare", bare), ("core", ours)):
        print(f"  {name:5} " + ", ".join(f"{k} {v:.2f}" for k, v in table.items()))
    if results["flow"]:
        print(f"  flow  {median_table(results['flow'])['flow wall']:.2f} (whole flow run)")
    waiting = ours["gate"]
    overhead = ours["total"] - bare["pull+up"] - waiting
    print(f"  overhead beyond bare pull+up and the gate's own waiting: {overhead:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
