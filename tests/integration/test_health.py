"""Health probes against real services: HTTPS with a real certificate, TCP, and
commands over the local sshd."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkeeper import health
from labkeeper.inventory import App, Probe
from labkeeper.locallab.ports import free_port
from labkeeper.locallab.sshd import LocalSshd
from labkeeper.pvesim.tls import generate_cert
from labkeeper.ssh import SshPool

pytestmark = pytest.mark.integration


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status":"ok","maintenance":false}' if self.path == "/status" else b"nope"
        self.send_response(200 if self.path == "/status" else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def https(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    cert = generate_cert(tmp_path_factory.mktemp("tls"), ("127.0.0.1",))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert.cert_file, cert.key_file)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert.cert_file
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def app_with(*probes: dict) -> App:
    return App(name="x", guest="g", strategy="commands", commands={"update": [["true"]]},
               health=list(probes))


def test_https_probe_verifies_the_certificate_against_the_ca_file(https):
    url, ca = https
    probe = Probe(http={"url": f"{url}/status", "ca_file": str(ca),
                        "body_contains": '"maintenance":false'})
    (r,) = health.run_round(app_with(probe.model_dump(exclude_none=True)))
    assert r.ok, r.detail


def test_https_probe_refuses_an_unknown_certificate(https):
    url, _ca = https
    (r,) = health.run_round(app_with({"http": {"url": f"{url}/status"}}))
    assert not r.ok and "TLS verification failed" in r.detail


def test_https_probe_with_verification_off_is_only_what_the_inventory_asked(https):
    url, _ca = https
    (r,) = health.run_round(app_with({"http": {"url": f"{url}/status", "verify_tls": False}}))
    assert r.ok


def test_http_probe_wrong_status_names_both_codes(https):
    url, ca = https
    (r,) = health.run_round(app_with({"http": {"url": f"{url}/other", "ca_file": str(ca)}}))
    assert not r.ok and r.detail == "HTTP 503, expected 200"


def test_tcp_probe_open_and_closed_ports(https):
    url, _ca = https
    port = int(url.rsplit(":", 1)[1])
    closed = free_port()
    ok, bad = health.run_round(app_with({"tcp": {"host": "127.0.0.1", "port": port}},
                                        {"tcp": {"host": "127.0.0.1", "port": closed},
                                         "timeout": 1}))
    assert ok.ok and not bad.ok and f"127.0.0.1:{closed}" in bad.detail


def test_command_probe_runs_over_ssh_checking_exit_and_stdout(local_sshd: LocalSshd):
    with SshPool() as pool:
        target = local_sshd.target()
        app = app_with(
            {"command": {"argv": ["sh", "-c", "echo ready"], "stdout_contains": "ready"}},
            {"command": {"argv": ["sh", "-c", "echo booting; exit 3"]}},
            {"command": {"argv": ["sh", "-c", "exit 3"], "expect_exit": 3}},
        )
        good, bad, expected = health.run_round(app, ssh=lambda: pool.get(target))
    assert good.ok, good.detail
    assert not bad.ok and "exit 3, expected 0" in bad.detail
    assert expected.ok


def test_gate_over_real_probes_opens_after_n_successes(https):
    url, ca = https
    app = app_with({"http": {"url": f"{url}/status", "ca_file": str(ca)}})
    app = app.model_copy(update={"gate": app.gate.model_copy(
        update={"initial_delay": 0, "interval": 0.05, "deadline": 5, "successes": 3})})
    out = health.run_gate(lambda: health.run_round(app), app.gate)
    assert out.passed and out.rounds == 3
