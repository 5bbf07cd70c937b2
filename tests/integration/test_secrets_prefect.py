"""prefect-block: secret references against a real (temporary) Prefect server."""

from __future__ import annotations

import pytest

from labkeeper import secrets
from labkeeper.errors import SecretError
from labkeeper.secrets import resolve


def test_missing_prefect_block_names_the_reference(prefect_harness):
    with pytest.raises(SecretError, match="prefect-block:labkeeper-missing"):
        resolve("prefect-block:labkeeper-missing")


def test_prefect_block_reference_resolves(prefect_harness):
    from prefect.blocks.system import Secret

    Secret(value="block-secret-value-42").save("labkeeper-test-secret", overwrite=True)
    assert resolve("prefect-block:labkeeper-test-secret").get_secret_value() == \
        "block-secret-value-42"
    assert "block-secret-value-42" not in secrets.redact("block-secret-value-42")


def test_prefect_block_reference_resolves_inside_a_running_event_loop(prefect_harness):
    # Prefect's Secret.load hands back a coroutine when it sees a running loop; resolve
    # is synchronous and must return the value there too.
    import asyncio

    from prefect.blocks.system import Secret

    Secret(value="block-secret-in-loop-7").save("labkeeper-test-secret-loop", overwrite=True)

    async def inside_a_loop() -> str:
        return resolve("prefect-block:labkeeper-test-secret-loop").get_secret_value()

    assert asyncio.run(inside_a_loop()) == "block-secret-in-loop-7"
