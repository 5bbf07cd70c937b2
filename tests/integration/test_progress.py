"""Progress of streaming steps, for real: a pipeline's producer reports every byte it
relays, and a backup and a drill of the lab's database write progress lines to the
run log (a tiny ``settings.progress_interval`` makes a small database produce them)."""

from __future__ import annotations

import contextvars
import logging
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
    messages = _Messages()
    labkeeper_log = logging.getLogger("labkeeper")
    level = labkeeper_log.level
    labkeeper_log.addHandler(messages)
    labkeeper_log.setLevel(logging.INFO)
    try:
        result = pg_backup.backup_database(inv, name)
    finally:
        labkeeper_log.removeHandler(messages)
        labkeeper_log.setLevel(level)
    return inv, name, messages.said, result


class _Messages(logging.Handler):
    """The messages of labkeeper's records (a module-scoped fixture has no caplog)."""

    def __init__(self) -> None:
        super().__init__()
        self.said: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.said.append(record.getMessage())


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


_RUN = contextvars.ContextVar("run", default="none")


class _InContext(logging.Handler):
    """Each record's message with the value of ``_RUN`` in the thread that logged it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), _RUN.get()))


def test_a_drill_of_the_lab_database_logs_restore_progress_against_the_dump_size(
        backed_up, caplog):
    inv, name, _said, _result = backed_up
    caplog.set_level(logging.INFO, logger="labkeeper")
    where = _InContext()
    logging.getLogger("labkeeper").addHandler(where)
    token = _RUN.set("drill-run")
    try:
        result = drill.database_drill(inv, name)
    finally:
        _RUN.reset(token)
        logging.getLogger("labkeeper").removeHandler(where)
    said = caplog.messages
    # (the drill's globals check needs a globals backup this test does not make)
    assert any(c.name == "dump size" and c.ok for c in result.checks), result.checks
    lines = [ln for ln in said if ln.startswith(f"{name}: restore: ")]
    assert len(lines) >= 2 and "done" in lines[-1], said
    # the manifest's exact dump size is the total: percent and, mid-stream, an ETA
    assert all(re.search(r" of [\d.]+ (B|KiB|MiB) \(\d+%\)", ln) for ln in lines[:-1]), lines
    # lines written from the pipeline's relay thread keep the drill's context (a flow
    # run's, in a deployment), so they reach that run's log
    contexts = {ctx for msg, ctx in where.seen if msg.startswith(f"{name}: restore: ")}
    assert contexts == {"drill-run"}, where.seen


def _within(text: str, size: int, tolerance: float) -> bool:
    """``text`` (``7.6 MiB``) names ``size`` give or take ``tolerance`` (the database may
    have grown a little since its snapshot)."""
    value, unit = text.split()
    scale = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    return abs(float(value) * scale - size) <= tolerance * size + scale * 0.05
