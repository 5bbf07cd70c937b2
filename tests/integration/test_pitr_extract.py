"""A base backup's tar stream is read to its very end: an archive whose padding after
the end-of-archive blocks is still being written when tar has what it needs (what
``restic dump`` does under load) extracts cleanly instead of failing the restore."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from labkeeper import process
from labkeeper.pitr.restore import extract_argv

pytestmark = pytest.mark.integration

# Writes a small tar archive, then 4 MB of zeros (more than any pipe holds): a tar that
# stops reading at the end-of-archive blocks leaves this producer blocked, then EPIPE.
PRODUCER = """
import io, sys, tarfile
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
    data = b"PG_VERSION 17\\n"
    info = tarfile.TarInfo("PG_VERSION"); info.size = len(data)
    t.addfile(info, io.BytesIO(data))
sys.stdout.buffer.write(buf.getvalue())
sys.stdout.buffer.write(b"\\0" * (4 << 20))
"""


def test_an_archive_with_long_padding_extracts_and_the_pipeline_succeeds(tmp_path: Path):
    dest = tmp_path / "data"
    dest.mkdir()
    res = process.pipeline([(sys.executable, "-c", PRODUCER), extract_argv(dest)],
                           timeout=60)
    assert res.cause is None
    assert (dest / "PG_VERSION").read_text() == "PG_VERSION 17\n"
