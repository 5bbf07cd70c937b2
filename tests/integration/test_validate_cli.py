"""``labkeeper validate`` as a real process: a bad file ends in ``FILE:LINE: message`` and
exit 1, never a Python traceback (the in-process fuzzing is in tests/unit/test_yaml_loader.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LABKEEPER = Path(sys.executable).parent / "labkeeper"
EXAMPLE = Path(__file__).resolve().parents[2] / "lab.example.yaml"


def _validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LABKEEPER), "validate", str(path)], capture_output=True,
                          text=True, timeout=120, check=False)


@pytest.mark.parametrize(("bad", "says"), [
    ("\x1b[31m", "unacceptable character ESC"),
    ("\x00", "unacceptable character NUL"),
    ("[" * 20000 + "]" * 20000, "nested deeper than"),
])
def test_validate_process_reports_a_bad_inventory_with_file_and_line_and_exits_1(
        tmp_path, bad, says):
    text = EXAMPLE.read_text()
    line = text[:text.index("\nlab:")].count("\n") + 2
    path = tmp_path / "lab.yaml"
    path.write_text(text.replace("\nlab:", f"\nextra: {bad}\nlab:", 1))
    res = _validate(path)
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr + res.stdout
    assert f"  {path}:{line}: " in res.stderr and says in res.stderr, res.stderr
