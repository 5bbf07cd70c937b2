"""Recorded real-world outputs (Proxmox task logs and API responses, Compose JSON).

A copy of the project's shared fixtures (``../shared/fixtures``, sources in
``data/recorded/README.md``), vendored so the suite runs from any checkout.
"""

from pathlib import Path

RECORDED = Path(__file__).resolve().parent / "data" / "recorded"
PVE = RECORDED / "pve"
COMPOSE = RECORDED / "compose"
