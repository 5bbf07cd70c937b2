"""The admin guide states exactly the privileges the adapter derives."""

from __future__ import annotations

import re
from pathlib import Path

from labkeeper.proxmox import REQUIRED_PRIVILEGES

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "ADMIN_GUIDE.md"


def test_admin_guide_role_equals_the_derived_least_privilege_set():
    text = GUIDE.read_text()
    block = re.search(r"<!-- privileges:start -->\s*```\s*(.*?)\s*```", text, re.S)
    assert block, "privileges block missing from the admin guide"
    assert set(block.group(1).split()) == set(REQUIRED_PRIVILEGES)
    role_cmd = re.search(r'pveum role add LabKeeper --privs "([^"]+)"', text)
    assert role_cmd and set(role_cmd.group(1).split()) == set(REQUIRED_PRIVILEGES)


def test_configuration_reference_is_generated_from_the_current_models():
    from labkeeper.docgen import render

    committed = (GUIDE.parent / "CONFIGURATION.md").read_text()
    assert committed.rstrip("\n") == render().rstrip("\n"), \
        "docs/CONFIGURATION.md is stale: run `python -m labkeeper.docgen > docs/CONFIGURATION.md`"
