"""Prefect's clients share one TLS context while the API is plain http (flows/prefect_tls.py)."""

from __future__ import annotations

import shutil
import ssl

import certifi
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import (
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_API_URL,
    temporary_settings,
)

import flows  # noqa: F401  (installs flows.prefect_tls)
from flows import prefect_tls


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The CA files of the contexts really made (``ssl.create_default_context``), from
    an empty cache on."""
    calls: list[str | None] = []
    real = ssl.create_default_context

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs.get("cafile"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ssl, "create_default_context", counting)
    monkeypatch.setattr(prefect_tls, "_cache", {})
    return calls


def test_prefects_client_modules_use_the_shared_contexts() -> None:
    import importlib

    for name in prefect_tls.PATCHED_MODULES:
        assert isinstance(importlib.import_module(name).ssl, prefect_tls.SharedContexts)


def test_clients_made_while_the_api_is_plain_http_read_the_ca_bundle_once(
        made: list[str | None]) -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        get_client(sync_client=True)
        get_client(sync_client=True)
        get_client()
    assert len(made) == 1 and made[0]


def test_an_https_api_gets_a_context_of_its_own_for_every_client(
        made: list[str | None]) -> None:
    with temporary_settings({PREFECT_API_URL: "https://prefect.example.org/api"}):
        first = get_client(sync_client=True)
        second = get_client(sync_client=True)
    assert len(made) == 2
    assert first is not second


def test_the_unverified_context_is_made_fresh_and_never_shared(
        made: list[str | None]) -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        shared = prefect_tls.SharedContexts().create_default_context(cafile=certifi.where())
        with temporary_settings({PREFECT_API_TLS_INSECURE_SKIP_VERIFY: True}):
            get_client(sync_client=True)
            get_client(sync_client=True)
        assert made.count(None) == 2  # Prefect's own unverified contexts, one each
        again = prefect_tls.SharedContexts().create_default_context(cafile=certifi.where())
    assert again is shared
    assert shared.verify_mode == ssl.CERT_REQUIRED and shared.check_hostname


def test_a_changed_ca_file_is_read_again(made: list[str | None], tmp_path) -> None:
    bundle = tmp_path / "ca.pem"
    shutil.copy(certifi.where(), bundle)
    shim = prefect_tls.SharedContexts()
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        first = shim.create_default_context(cafile=str(bundle))
        assert shim.create_default_context(cafile=str(bundle)) is first
        bundle.write_bytes(bundle.read_bytes() + b"\n")
        assert shim.create_default_context(cafile=str(bundle)) is not first
    assert len(made) == 2


def test_a_missing_ca_file_still_fails_as_it_would_have(made: list[str | None],
                                                        tmp_path) -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}), \
            pytest.raises(FileNotFoundError):
        prefect_tls.SharedContexts().create_default_context(cafile=str(tmp_path / "none"))


def test_warm_makes_the_context_later_clients_use(made: list[str | None]) -> None:
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        prefect_tls.warm()
        assert len(made) == 1
        get_client(sync_client=True)
        get_client()
    assert len(made) == 1


def test_warming_with_an_unreadable_ca_file_leaves_the_error_to_the_clients(
        made: list[str | None], tmp_path) -> None:
    missing = str(tmp_path / "no-such-ca.pem")
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api",
                             PREFECT_API_SSL_CERT_FILE: missing}):
        prefect_tls.warm()  # the runner's start does not fail on it
        with pytest.raises(FileNotFoundError):
            get_client(sync_client=True)


def test_the_shim_hands_everything_else_to_ssl() -> None:
    shim = prefect_tls.SharedContexts()
    assert shim.CERT_NONE is ssl.CERT_NONE and shim.SSLContext is ssl.SSLContext
