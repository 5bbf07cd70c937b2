"""Which code a process runs: a stamp of labkeeper's sources and its Python.

A warm process (the command line's runner, `labkeeper serve`'s forkserver) imported the
code once; it compares this stamp with the one it started with before it hands work to
that code, so a change on disk is never served from stale imports. Only the standard
library: the command line's thin client imports it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Mapping

PIN = "LABKEEPER_RUNNER_STAMP"
PACKAGES = ("cli", "flows", "tasks", "deployments", "labkeeper")


def _newest(top: str) -> tuple[int, int]:
    """(newest mtime in ns, count) over the directories and .py files under ``top``."""
    newest, count = 0, 0
    stack = [top]
    while stack:
        with contextlib.suppress(OSError), os.scandir(stack.pop()) as entries:
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    if e.name != "__pycache__":
                        stack.append(e.path)
                        newest = max(newest, e.stat(follow_symlinks=False).st_mtime_ns)
                elif e.name.endswith(".py"):
                    newest = max(newest, e.stat(follow_symlinks=False).st_mtime_ns)
                    count += 1
    return newest, count


def code_stamp(root: str | None = None, environ: Mapping[str, str] = os.environ) -> str:
    """What code a process runs: labkeeper's path, the interpreter, the newest change of
    the packages' sources (and of pyproject.toml: the version) and of site-packages (an
    upgraded dependency). A few milliseconds; equal stamps mean the runner's imports
    are what this command would import. ``LABKEEPER_RUNNER_STAMP`` pins it instead
    (the tests, while other work edits the checkout; a deployment that restarts the
    runner on upgrade itself)."""
    if root is None and environ.get(PIN):
        return f"pinned:{environ[PIN]}"
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts: list[object] = [root, sys.executable, sys.version]
    for pkg in PACKAGES:
        parts.extend(_newest(os.path.join(root, pkg)))
    for path in (os.path.join(root, "pyproject.toml"),
                 *(p for p in sys.path if p.endswith("site-packages"))):
        with contextlib.suppress(OSError):
            parts.append(os.stat(path).st_mtime_ns)
    return "|".join(map(str, parts))
