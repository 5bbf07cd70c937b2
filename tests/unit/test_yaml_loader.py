"""Bad input never crashes the loaders: every bad inventory or runbook ends in
``FILE:LINE: message`` and exit 1 — control characters, deep nesting, alias bombs,
huge files and random mutations (hypothesis) included."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from labkeeper import runbook as rb
from labkeeper.errors import ConfigError
from labkeeper.inventory import validate_file, validate_text
from tests.unit.test_inventory import BASE, line_of

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = (REPO / "lab.example.yaml").read_bytes()
RUNBOOK = (REPO / "runbooks" / "rollback-app.yaml").read_bytes()
SMALL = b"version: 1\nlab: {name: x}\nguests:\n  - {name: a, vmid: 100}\n"

LAUGHS = "".join(
    f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "lol"] * 10) + "]\n"
    for i in range(9))  # 10**9 nodes once expanded


def only(problems):
    assert len(problems) == 1, problems
    return problems[0]


def validate_cli(path: Path):
    """``labkeeper validate PATH`` in-process: the CLI's own code path."""
    return CliRunner().invoke(app, ["validate", str(path)])


def assert_reported_with_lines(res, path: Path) -> None:
    """Exit 1 and every problem printed as ``PATH:LINE ...`` (no traceback)."""
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = res.output.splitlines()
    assert lines[0].startswith(f"{path}: ") and "problem" in lines[0], res.output
    pattern = re.compile(rf"^  {re.escape(str(path))}:\d+[ :]")
    assert lines[1:] and all(pattern.match(ln) for ln in lines[1:]), res.output


# -- the named cases ---------------------------------------------------------------------


@pytest.mark.parametrize(("char", "name"), [("\x1b", "ESC"), ("\x00", "NUL")])
def test_control_character_is_a_problem_on_its_line_not_a_traceback(tmp_path, char, name):
    path = tmp_path / "lab.yaml"
    text = BASE.replace("    vmid: 120\n", f"    vmid: 120{char}\n")
    path.write_text(text)
    res = validate_cli(path)
    assert_reported_with_lines(res, path)
    assert f"{path}:{line_of(text, 'vmid: 120')}: unacceptable character {name}" in res.output


def test_deeply_nested_flow_sequences_stop_at_the_depth_limit_with_their_line():
    text = BASE + "extra: " + "[" * 5000 + "]" * 5000 + "\n"
    p = only(validate_text(text, "lab.yaml"))
    assert p.line == line_of(text, "extra:")
    assert "nested deeper than" in p.message


def test_alias_bomb_stops_while_composing_at_the_alias_that_crosses_the_limit():
    # counted as it is composed: the problem names the alias that crossed the limit
    # (the builder, counting after composing, could only say "too large")
    text = "version: 1\n" + LAUGHS
    p = only(validate_text(text, "lab.yaml"))
    assert re.search(r"more than \d+ nodes \(aliases expanded\)", p.message), p.message
    assert line_of(text, "l1: &l1") < p.line < line_of(text, "l8: &l8")  # stopped early


def test_unclosed_flow_sequence_is_reported_where_it_opened_and_where_parsing_gave_up():
    text = BASE.replace("hosts:\n", "tags: [backup,\n  nightly,\n  offsite,\n  db\nhosts:\n")
    p = only(validate_text(text, "lab.yaml"))
    opened, gave_up = line_of(text, "tags: [backup"), line_of(text, "hosts:")
    assert gave_up - opened == 4
    assert p.line == opened  # the line a person needs
    assert "while parsing a flow sequence" in p.message
    assert f"(line {opened})" in p.message and f"(line {gave_up}, column" in p.message


def test_mis_indented_key_is_reported_where_the_parser_gave_up_not_at_the_top():
    text = BASE.replace("\nguests:\n", "\n guests:\n")
    p = only(validate_text(text, "lab.yaml"))
    assert p.line == line_of(text, " guests:") and p.line > 1
    assert "while parsing a block mapping (line 1)" in p.message  # named too


def test_file_larger_than_the_cap_is_refused_without_reading_it_all(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_bytes(b"version: 1\nlab: {name: x}\nnotes: |\n" + b"  xxxxxxxxxxxxxxx\n" * 300_000)
    p = only(validate_file(path))
    assert p.line is not None and p.line > 3 and "larger than" in p.message
    p = only(validate_file("/dev/zero"))  # endless: read only up to the cap
    assert p.line == 1 and "larger than" in p.message


def test_fifo_without_a_writer_is_an_empty_file_not_a_hang(tmp_path):
    import os
    import threading

    path = tmp_path / "lab.yaml"
    os.mkfifo(path)
    found: list[object] = []
    reader = threading.Thread(target=lambda: found.extend(validate_file(path)), daemon=True)
    reader.start()
    reader.join(timeout=60)
    if reader.is_alive():  # unblock the reader: open the FIFO for writing, close it
        os.close(os.open(path, os.O_WRONLY))
        pytest.fail("validate_file waited for a writer")
    assert "empty" in only(found).message


def test_invalid_utf8_names_its_line(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_bytes(BASE.encode().replace(b"vmid: 120", b"vmid: 1\xff20"))
    res = validate_cli(path)
    assert_reported_with_lines(res, path)
    assert f"{path}:{line_of(BASE, 'vmid: 120')}: the file is not UTF-8 text" in res.output


@pytest.mark.parametrize("bad", ["extra: \x1b", "extra: " + "[" * 3000 + "]" * 3000, LAUGHS])
def test_runbook_loader_reports_bad_yaml_with_file_and_line(tmp_path, bad):
    path = tmp_path / "rollback-app.yaml"
    path.write_bytes(RUNBOOK.replace(b"\nsteps:\n", f"\n{bad}\nsteps:\n".encode(), 1))
    with pytest.raises(ConfigError) as info:
        rb.load_runbook(path)
    assert info.value.problems
    assert all(re.match(rf"{re.escape(str(path))}:\d+: ", p) for p in info.value.problems), \
        info.value.problems


# -- fuzzing -----------------------------------------------------------------------------

INSERTS = [b"\x1b", b"\x00", b"\x07", b"\x7f", "\u0085".encode(), "\ufeff".encode(),
           "\ufffe".encode(), b"\xff", b"\xc3", b"[", b"]", b"{", b"}", b",", b":", b": ",
           b"- ", b"? ", b"&a ", b"*a", b"&b ", b"*b", b"<<: *a\n", b"!!int ", b"!!binary ",
           b"!!map ", b"!!set ", b"!!python/object:os.system ", b"!foo ", b"|", b">", b"'",
           b'"', b"\t", b"\n", b"\r", b"  ", b"#", b"%YAML 1.1\n", b"---\n", b"...\n", b"@",
           b"`", b"\\", b"0x", b"1e9999", b".nan", b"~", b"null", b"-1",
           b"[" * 99, b"[" * 101, b"{a: " * 150, b"- " * 150, b"[" * 4000,
           f"\n{LAUGHS}".encode(), b"\nx: &a [*a]\n", b"\nx: &a {<<: *a}\n"]


@st.composite
def mutated(draw: st.DrawFn, sources: tuple[bytes, ...]) -> bytes:
    data = bytearray(draw(st.sampled_from(sources)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "insert", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 40))]
        elif op == "insert":
            data[at:at] = draw(st.one_of(st.sampled_from(INSERTS), st.binary(max_size=8)))
        else:
            chunk = bytes(data[at:at + draw(st.integers(1, 200))])
            data[at:at] = chunk * draw(st.sampled_from([2, 20, 500]))  # huge: its own test
    return bytes(data)


FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(mutated((EXAMPLE, SMALL, BASE.encode())))
def test_mutated_inventory_is_valid_or_reported_with_lines_never_a_traceback(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lab.yaml"
        path.write_bytes(data)
        res = validate_cli(path)
        if res.exit_code == 0:
            assert res.exception is None and f"{path}: ok" in res.output, res.output
            assert "Traceback" not in res.output
        else:
            assert_reported_with_lines(res, path)


@FUZZ
@given(mutated((RUNBOOK,)))
def test_mutated_runbook_loads_or_is_reported_with_lines_never_a_traceback(data):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rollback-app.yaml"
        path.write_bytes(data)
        try:
            rb.load_runbook(path)
        except ConfigError as exc:
            assert exc.problems, str(exc)
            assert all(re.match(rf"{re.escape(str(path))}:\d+[ :]", p)
                       for p in exc.problems), exc.problems
