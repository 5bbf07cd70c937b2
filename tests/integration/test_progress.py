"""Progress of streaming steps, for real: a pipeline's producer reports every byte it
relays, and a backup and a drill of the lab's database write progress lines to the
run log (a tiny ``settings.progress_interval`` makes a small database produce them)."""

from __future__ import annotations

import re

import pytest
import yaml

from labkeeper import drill, pg_backup, postgres, process
from labkeeper.inventory import load_inventory
from labkeeper.progress import human_bytes

SIZE = 3_000_000


@pytest.mark.parametrize("gated", [False, True], ids=["spliced", "gated"])
def test_a_producer_s_on_bytes_gets_every_byte_the_relay_hands_on(gated):
    seen: list[int] = []
    producer = process.Stage(("head", "-c", str(SIZE), "/dev/zero"), on_bytes=seen.append,
                             eof_gate=(lambda _tail, _n: None) if gated else None)
    res = process.pipeline([producer, ("wc", "-c")], timeout=60)
    assert res.stdout.strip() == str(SIZE)
    assert sum(seen) == SIZE == res.bytes_relayed[0]
    assert all(n > 0 for n in seen)


@pytest.fixture(scope="module")
def backed_up(lab, tmp_path_factory):
    """A backup of the lab's first database, its log, under an inventory that asks for
    a progress line at every chance."""
    raw = yaml.safe_load(lab.inventory_path.read_text())
    raw.setdefault("settings", {})["progress_interval"] = 0.001
    path = tmp_path_factory.mktemp("progress") / "lab.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    inv = load_inventory(path)
    name = inv.databases[0].name
    said: list[str] = []
    result = pg_backup.backup_database(inv, name, log=said.append)
    return inv, name, said, result


def test_a_backup_of_the_lab_database_logs_dump_progress_with_the_size_estimate(backed_up):
    inv, name, said, result = backed_up
    conn = pg_backup.conn_for(inv, inv.database(name))
    size = int(postgres.query(conn, "SELECT pg_database_size(current_database())",
                              timeout=60)[0][0])
    lines = [ln for ln in said if ln.startswith(f"{name}: dump: ")]
    moving = [ln for ln in lines if "done" not in ln]
    assert moving, said
    # bytes, the database's size as the (approximate) total, a rate
    pattern = rf"{name}: dump: [\d.]+ (B|KiB|MiB) (of ~[\d.]+ (KiB|MiB) \(\d+%\)|\(more than .*\))"
    assert all(re.match(pattern, ln) and "/s" in ln for ln in moving), moving
    estimates = {m.group(1) for ln in moving if (m := re.search(r"of ~([\d.]+ \w+) ", ln))}
    assert estimates and all(_within(e, size, 0.05) for e in estimates), (estimates, size)
    assert lines[-1].startswith(f"{name}: dump: done, {human_bytes(result.bytes_dumped)} in ")


def test_a_drill_of_the_lab_database_logs_restore_progress_against_the_dump_size(
        backed_up):
    inv, name, _said, _result = backed_up
    said: list[str] = []
    result = drill.database_drill(inv, name, log=said.append)
    # (the drill's globals check needs a globals backup this test does not make)
    assert any(c.name == "dump size" and c.ok for c in result.checks), result.checks
    lines = [ln for ln in said if ln.startswith(f"{name}: restore: ")]
    assert len(lines) >= 2 and "done" in lines[-1], said
    # the manifest's exact dump size is the total: percent and, mid-stream, an ETA
    assert all(re.search(r" of [\d.]+ (B|KiB|MiB) \(\d+%\)", ln) for ln in lines[:-1]), lines


def _within(text: str, size: int, tolerance: float) -> bool:
    """``text`` (``7.6 MiB``) names ``size`` give or take ``tolerance`` (the database may
    have grown a little since its snapshot)."""
    value, unit = text.split()
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    return abs(float(value) * scale - size) <= tolerance * size + scale * 0.05
