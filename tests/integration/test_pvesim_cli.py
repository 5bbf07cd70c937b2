"""``labkeeper pvesim serve`` as a real process, reached through the adapter with a pin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from labkeeper import proxmox as px
from labkeeper.errors import ServiceError
from labkeeper.inventory import Proxmox
from labkeeper.locallab.ports import free_port, wait_for_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_pvesim_serve_answers_version_through_the_adapter_with_pinned_fingerprint(
        tmp_path: Path) -> None:
    port = free_port()
    secret = str(uuid.uuid4())
    fp_file = tmp_path / "fingerprint"
    env = {**os.environ, "PVESIM_TEST_SECRET": secret}
    argv = [sys.executable, "-m", "cli.main", "pvesim", "serve",
            "--port", str(port), "--nodes", "pve1,pve2",
            "--token-id", "labkeeper@pve!cli", "--token-secret-env", "PVESIM_TEST_SECRET",
            "--task-duration", "0.05", "--state", str(tmp_path / "state.json"),
            "--fingerprint-file", str(fp_file)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert secret not in " ".join(argv)  # the secret travels in the environment only
        wait_for_port("127.0.0.1", port, timeout=30)
        deadline = time.monotonic() + 10
        while not fp_file.exists() or not fp_file.read_text().strip():
            assert time.monotonic() < deadline, "no fingerprint file"
            time.sleep(0.05)
        fingerprint = fp_file.read_text().strip()
        (tmp_path / "token").write_text(secret)
        spec = Proxmox.model_validate({
            "host": "127.0.0.1", "port": port, "token_id": "labkeeper@pve!cli",
            "token_secret": f"file:{tmp_path / 'token'}",
            "tls": {"verify": False, "fingerprint": fingerprint},
            "nodes": [{"name": "pve1"}]})
        api = px.connect(spec)
        assert px.version(api) == "9.1.1"
        assert px.node_names(api) == ["pve1", "pve2"]
        wrong = ":".join(["00"] * 32)
        bad = px.connect(spec.model_copy(update={"tls": spec.tls.model_copy(
            update={"fingerprint": wrong})}))
        with pytest.raises(ServiceError, match="TLS verification failed"):
            px.version(bad)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    assert proc.returncode == 0, err
    assert "pvesim listening on" in out
    assert secret not in out + err
    assert (tmp_path / "state.json").exists()
