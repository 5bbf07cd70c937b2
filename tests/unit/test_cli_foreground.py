"""A flow command run in the foreground sends no flow-run heartbeats (their end costs
0-1 s per command); other commands do not even import Prefect for it."""

from __future__ import annotations

import contextlib

from cli import main


def test_a_flow_command_runs_with_heartbeats_off_and_they_come_back_after():
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        with main._foreground(["backup", "run", "--db", "app"]):
            assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() is None
        assert PREFECT_FLOWS_HEARTBEAT_FREQUENCY.value() == 30


def test_serve_and_commands_without_a_flow_keep_the_settings():
    for args in (["serve"], ["validate"], ["backup", "list"], ["backup", "run", "--help"]):
        assert isinstance(main._foreground(args), contextlib.nullcontext), args
