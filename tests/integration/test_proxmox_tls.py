"""TLS pinning of the Proxmox API on an IPv6 host (proxmoxer brackets the address)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, ServiceError
from labkeeper.inventory import Proxmox
from labkeeper.pvesim import Simulator
from tests.fixtures.pvesim import TOKEN_ID, PveCredentials

pytestmark = pytest.mark.integration


def _spec(sim: Simulator, secret_file: Path, tls: dict[str, Any]) -> Proxmox:
    return Proxmox.model_validate({
        "host": sim.host, "port": sim.port, "token_id": TOKEN_ID,
        "token_secret": f"file:{secret_file}", "tls": tls, "timeout": 10,
        "nodes": [{"name": "pve1"}]})


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory: pytest.TempPathFactory,
                pvesim_credentials: PveCredentials) -> Path:
    path = tmp_path_factory.mktemp("pve6") / "token"
    path.write_text(pvesim_credentials.token_secret + "\n")
    path.chmod(0o600)
    return path


def test_ipv6_host_with_the_right_pinned_fingerprint_is_accepted(
        pvesim_v6: Simulator, secret_file: Path) -> None:
    api = px.connect(_spec(pvesim_v6, secret_file,
                           {"verify": False, "fingerprint": pvesim_v6.fingerprint}))
    assert px.node_names(api) == ["pve1"]
    session = api._store["session"]
    assert isinstance(session.get_adapter(f"{pvesim_v6.url}/api2/json/nodes"),
                      px.FingerprintAdapter)


def test_ipv6_host_with_a_wrong_pinned_fingerprint_is_refused(
        pvesim_v6: Simulator, secret_file: Path) -> None:
    wrong = ":".join(["AB"] * 32)
    api = px.connect(_spec(pvesim_v6, secret_file, {"verify": False, "fingerprint": wrong}))
    with pytest.raises(ServiceError, match="TLS verification failed") as info:
        px.version(api)
    assert not info.value.transient


def test_a_url_outside_the_pinned_base_is_refused_not_sent_unverified(
        pvesim_v6: Simulator, secret_file: Path) -> None:
    api = px.connect(_spec(pvesim_v6, secret_file,
                           {"verify": False, "fingerprint": pvesim_v6.fingerprint}))
    session = api._store["session"]
    with pytest.raises(ServiceError, match="not under the pinned base URL"):
        session.get(f"{pvesim_v6.url}/other", verify=False, timeout=5)


def test_a_session_that_does_not_resolve_to_the_pin_fails_closed() -> None:
    with pytest.raises(ConfigError, match="would not apply"):
        px.pin_session(_OtherRouting(), "https://[::1]:8006/api2/json", "AB:" * 31 + "AB")


class _OtherRouting(requests.Session):
    """A session routing URLs its own way (a future proxmoxer session class, say)."""

    def get_adapter(self, url: str) -> Any:
        return requests.adapters.HTTPAdapter()
