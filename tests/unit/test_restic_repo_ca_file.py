"""A repository's S3 ``ca_file`` reaches restic's argv as text (local and over ssh)."""

from __future__ import annotations

import shlex

from labkeeper.inventory import parse_inventory
from labkeeper.restic.repository import repo_for

INVENTORY = """
version: 1
lab: {name: t, timezone: UTC}
repositories:
  - name: r
    url: s3:https://s3.example.test/bucket/restic
    password: env:H9_RP
    s3:
      endpoint: https://s3.example.test
      bucket: bucket
      access_key_id: env:H9_KEY
      secret_access_key: env:H9_SECRET
      ca_file: /etc/labkeeper/s3-ca.pem
"""


def test_repository_ca_file_is_a_string_argument_that_quotes_for_ssh(monkeypatch):
    for name in ("H9_RP", "H9_KEY", "H9_SECRET"):
        monkeypatch.setenv(name, f"value-of-{name.lower()}")
    repo = repo_for(parse_inventory(INVENTORY, "t.yaml"), "r")
    argv = repo.base_argv("restic")
    assert argv == ("restic", "--cacert", "/etc/labkeeper/s3-ca.pem")
    assert all(isinstance(a, str) for a in argv)
    assert shlex.join(argv) == "restic --cacert /etc/labkeeper/s3-ca.pem"
