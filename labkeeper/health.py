"""Health probes and the health gate.

Probes come from the inventory (``App.health``): HTTP (status code, optional body
text, TLS verified — against ``ca_file`` when given), TCP connect, a command over
SSH on the app's guest (exit code, optional stdout text) and Compose container
health. A *round* runs every probe once; it passes when all of them pass.

The gate (``App.gate``): wait ``initial_delay`` seconds, then run a round every
``interval`` seconds until ``successes`` consecutive rounds passed (gate open) or
``deadline`` seconds since the gate began have gone by (gate failed).

Pure parts (:func:`judge_http`, :func:`judge_command`, :class:`GateTracker`) decide;
thin runners (:func:`run_probe`, :func:`run_gate`) do the I/O with injectable clock
and sleep.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import requests

from labkeeper import compose
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import (
    App,
    AppCompose,
    CommandProbe,
    Gate,
    HttpProbe,
    Inventory,
    Probe,
)
from labkeeper.secrets import redact

logger = logging.getLogger(__name__)

BODY_LIMIT = 1024 * 1024
"""Bytes of an HTTP body read when looking for ``body_contains``."""

SshFactory = Callable[[], Any]
"""Returns a connected :class:`labkeeper.ssh.SshClient` for the app's guest."""


@dataclass(frozen=True)
class ProbeResult:
    name: str
    kind: str
    ok: bool
    detail: str
    seconds: float = 0.0
    waiting: bool = False
    """Not healthy *yet* (a container whose health is ``starting``)."""

    def row(self) -> dict[str, Any]:
        return {"probe": self.name, "kind": self.kind, "ok": self.ok,
                "detail": redact(self.detail), "seconds": round(self.seconds, 3)}


def probe_name(probe: Probe, index: int = 0) -> str:
    if probe.name:
        return probe.name
    if probe.http is not None:
        return f"http {probe.http.url}"
    if probe.tcp is not None:
        return f"tcp {probe.tcp.host or 'guest'}:{probe.tcp.port}"
    if probe.command is not None:
        return f"command {' '.join(probe.command.argv)[:60]}"
    return f"container #{index + 1}"


# --------------------------------------------------------------------------- pure judges


def judge_http(spec: HttpProbe, status: int, body: str | None) -> tuple[bool, str]:
    """Does an HTTP answer satisfy the probe? (ok, why)."""
    if status != spec.status:
        return False, f"HTTP {status}, expected {spec.status}"
    if spec.body_contains is not None and spec.method != "HEAD":
        if body is None or spec.body_contains not in body:
            return False, f"HTTP {status} but the body lacks {spec.body_contains!r}"
    return True, f"HTTP {status}"


def judge_command(spec: CommandProbe, returncode: int | None, stdout: str) -> tuple[bool, str]:
    if returncode != spec.expect_exit:
        return False, f"exit {returncode}, expected {spec.expect_exit}"
    if spec.stdout_contains is not None and spec.stdout_contains not in stdout:
        return False, f"exit {returncode} but stdout lacks {spec.stdout_contains!r}"
    return True, f"exit {returncode}"


# --------------------------------------------------------------------------- runners


def http_check(spec: HttpProbe, timeout: float) -> tuple[bool, str]:
    """One HTTP request; TLS is verified (against ``ca_file`` if set) unless the
    inventory turns it off for this probe. Redirects are not followed: the probe's
    ``status`` is what the URL itself must answer."""
    verify: bool | str = (str(spec.ca_file) if spec.ca_file else True) if spec.verify_tls \
        else False
    try:
        with requests.request(spec.method, str(spec.url), timeout=timeout, verify=verify,
                              allow_redirects=False, stream=True) as resp:
            body = None
            if spec.body_contains is not None and spec.method != "HEAD":
                raw = resp.raw.read(BODY_LIMIT, decode_content=True)
                body = raw.decode(resp.encoding or "utf-8", errors="replace")
            return judge_http(spec, resp.status_code, body)
    except requests.exceptions.SSLError as exc:
        return False, f"TLS verification failed: {_short(exc)}"
    except requests.exceptions.Timeout:
        return False, f"no answer within {timeout:g}s"
    except requests.exceptions.RequestException as exc:
        return False, f"request failed: {_short(exc)}"


def tcp_check(host: str, port: int, timeout: float) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, f"connected to {host}:{port}"
    except OSError as exc:
        return False, f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def command_check(ssh: SshFactory, spec: CommandProbe, timeout: float) -> tuple[bool, str]:
    try:
        result = ssh().run(spec.argv, timeout=timeout, check=False)
    except LabkeeperError as exc:
        return False, f"command not run: {_short(exc)}"
    ok, why = judge_command(spec, result.returncode, result.stdout)
    if not ok and result.stderr.strip():
        why += f" ({_short(result.stderr.strip().splitlines()[-1])})"
    return ok, why


def container_check(ssh: SshFactory, cfg: AppCompose, services: Sequence[str],
                    timeout: float) -> tuple[bool, str, bool]:
    try:
        result = ssh().run(compose.ps_argv(cfg), timeout=timeout, check=False)
    except LabkeeperError as exc:
        return False, f"docker compose ps not run: {_short(exc)}", False
    if result.returncode != 0:
        return False, f"docker compose ps exited {result.returncode}: " \
                      f"{_short(result.stderr.strip())}", False
    try:
        containers = compose.parse_ps(result.stdout)
    except compose.ComposeOutputError as exc:
        return False, f"docker compose ps output not understood: {exc}", False
    verdict = compose.container_health(containers, services)
    return verdict.ok, verdict.detail, verdict.waiting


def run_probe(probe: Probe, *, app: App, inv: Inventory | None, ssh: SshFactory | None,
              index: int = 0) -> ProbeResult:
    """Run one probe (with its own timeout) and say how it went; never raises for an
    unhealthy service."""
    name = probe_name(probe, index)
    started = time.monotonic()
    waiting = False
    if probe.http is not None:
        ok, detail = http_check(probe.http, probe.timeout)
    elif probe.tcp is not None:
        host = probe.tcp.host or _guest_address(inv, app)
        ok, detail = tcp_check(host, probe.tcp.port, probe.timeout)
    elif probe.command is not None:
        ok, detail = command_check(_need(ssh, name), probe.command, probe.timeout)
    else:
        assert probe.container is not None
        if app.compose is None:
            ok, detail = False, "container probes need a compose app"
        else:
            ok, detail, waiting = container_check(_need(ssh, name), app.compose,
                                                  probe.container.services, probe.timeout)
    return ProbeResult(name, probe.kind, ok, redact(detail), time.monotonic() - started,
                       waiting)


def run_round(app: App, *, inv: Inventory | None = None,
              ssh: SshFactory | None = None) -> list[ProbeResult]:
    """Every probe of the app once, in inventory order."""
    return [run_probe(p, app=app, inv=inv, ssh=ssh, index=i) for i, p in enumerate(app.health)]


def round_ok(results: Sequence[ProbeResult]) -> bool:
    return all(r.ok for r in results)


def summary(results: Sequence[ProbeResult]) -> str:
    if not results:
        return "no probes"
    bad = [r for r in results if not r.ok]
    if not bad:
        return f"{len(results)} probe(s) ok"
    return "; ".join(f"{r.name}: {r.detail}" for r in bad)


# --------------------------------------------------------------------------- the gate


Verdict = Literal["pending", "passed", "failed"]


@dataclass
class GateTracker:
    """Pure bookkeeping of a gate: feed it ``(seconds since start, round ok)``."""

    gate: Gate
    streak: int = 0
    rounds: int = 0
    verdict: Verdict = "pending"

    def record(self, elapsed: float, ok: bool) -> Verdict:
        if self.verdict != "pending":
            return self.verdict
        self.rounds += 1
        self.streak = self.streak + 1 if ok else 0
        if self.streak >= self.gate.successes:
            self.verdict = "passed"
        elif elapsed >= self.gate.deadline:
            self.verdict = "failed"
        return self.verdict

    def next_wait(self, elapsed: float) -> float | None:
        """Seconds to sleep before the next round, or None when no round fits before
        the deadline any more (the gate has failed)."""
        if self.verdict != "pending":
            return None
        if elapsed + self.gate.interval > self.gate.deadline:
            return None
        return self.gate.interval

    def first_wait(self) -> float:
        return self.gate.initial_delay


@dataclass
class GateOutcome:
    passed: bool
    rounds: int
    seconds: float
    reason: str
    last: list[ProbeResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "rounds": self.rounds,
                "seconds": round(self.seconds, 2), "reason": self.reason,
                "probes": [r.row() for r in self.last]}


def run_gate(round_fn: Callable[[], list[ProbeResult]], gate: Gate, *,
             clock: Callable[[], float] = time.monotonic,
             sleep: Callable[[float], None] = time.sleep,
             label: str = "") -> GateOutcome:
    """Run rounds until the gate opens or its deadline passes; each round logged
    (prefixed ``<label>: `` when a label is given)."""
    tracker = GateTracker(gate)
    start = clock()
    sleep(tracker.first_wait())
    last: list[ProbeResult] = []
    while True:
        last = round_fn()
        elapsed = clock() - start
        ok = round_ok(last)
        verdict = tracker.record(elapsed, ok)
        logger.info("%shealth round %d: %s (%d/%d in a row, %.1fs)",
                    f"{label}: " if label else "", tracker.rounds,
                    "ok" if ok else summary(last), tracker.streak, gate.successes, elapsed)
        if verdict == "passed":
            return GateOutcome(True, tracker.rounds, elapsed,
                               f"{gate.successes} healthy round(s) in a row", last)
        wait = tracker.next_wait(elapsed) if verdict == "pending" else None
        if wait is None:
            return GateOutcome(False, tracker.rounds, elapsed,
                               f"not healthy {gate.successes} time(s) in a row within "
                               f"{gate.deadline:g}s: {summary(last)}", last)
        sleep(wait)


# --------------------------------------------------------------------------- helpers


def _guest_address(inv: Inventory | None, app: App) -> str:
    if inv is None:
        raise ValueError("a tcp probe without host needs the inventory")
    address = inv.guest(app.guest).address
    if address is None:
        raise ValueError(f"guest {app.guest} has no address")
    return address


def _need(ssh: SshFactory | None, name: str) -> SshFactory:
    if ssh is None:
        raise ValueError(f"probe {name} runs over SSH: no SSH connection given")
    return ssh


def _short(exc: object, limit: int = 200) -> str:
    text = redact(str(exc))
    return text if len(text) <= limit else text[: limit - 1] + "…"
