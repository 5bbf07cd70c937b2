"""Fixture modules shared by every tier (each is a plain module under tests/fixtures)."""

pytest_plugins = [
    "tests.fixtures.prefect",
    "tests.fixtures.ssh",
    "tests.fixtures.lab",
    "tests.fixtures.pvesim",
    "tests.fixtures.e2e",
    "tests.fixtures.receiver",
]
