"""The small example inventories in examples/ are valid, warning-free and as small as
they say (a new user's first file is copied from one of them)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkeeper.inventory import load_inventory
from labkeeper.inventory.advice import warnings

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("name", ["backup-only.yaml", "one-node.yaml"])
def test_each_example_inventory_validates_without_warnings(name):
    inv = load_inventory(EXAMPLES / name)
    assert warnings(inv) == []


def test_every_yaml_file_in_examples_is_covered_by_these_tests():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == ["backup-only.yaml",
                                                               "one-node.yaml"]


def test_the_backup_only_example_needs_no_proxmox_and_no_ssh_and_uses_a_local_path():
    inv = load_inventory(EXAMPLES / "backup-only.yaml")
    assert inv.proxmox is None and not inv.guests and not inv.hosts
    assert inv.ssh_targets() == {}
    assert inv.databases and all(inv.repository_for(db).url.startswith("/")
                                 for db in inv.databases)


def test_the_one_node_example_has_one_node_and_a_few_guests_backed_up_and_drilled():
    inv = load_inventory(EXAMPLES / "one-node.yaml")
    assert inv.proxmox is not None and [n.name for n in inv.proxmox.nodes] == ["pve"]
    assert 2 <= len(inv.guests) <= 6
    assert inv.vzdump_jobs and inv.databases and inv.apps
    assert all(db.drill.server for db in inv.databases)
