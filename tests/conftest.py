"""Fixture modules shared by every tier (each is a plain module under tests/fixtures)."""

import importlib.util
import os
import sys
from pathlib import Path


def _packages_compiled() -> bool:
    spec = importlib.util.find_spec("prefect")
    origin = spec.origin if spec else None
    return not origin or Path(importlib.util.cache_from_source(origin)).exists()


# Bytecode cache, as the Makefile sets it. With PYTHONDONTWRITEBYTECODE=1 in the
# environment (no __pycache__ in the tree) and uv installing the venv's packages without
# .pyc files, every Python process the suite starts (Prefect servers, workers and
# flow-run processes, `prefect`/`labkeeper` CLI runs, moto_server, http.server guests)
# would compile prefect, boto3 & co. from source again: `import prefect` 2.1 s instead
# of 1.0 s. The cache goes to a prefix directory inside the venv (ignored by git,
# removed with the venv), never next to the sources; nothing changes when the packages
# were installed compiled or a prefix is set already.
if (os.environ.get("PYTHONDONTWRITEBYTECODE") and not os.environ.get("PYTHONPYCACHEPREFIX")
        and not _packages_compiled()):
    _prefix = str(Path(sys.prefix) / "pycache")
    os.environ["PYTHONPYCACHEPREFIX"] = _prefix
    sys.pycache_prefix = _prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False

# As the command line does: labkeeper's records go to the run they belong to, and a
# record outside any run (core code called directly) is not a Prefect warning.
from labkeeper import log_setup  # noqa: E402

log_setup.prefect_environment(os.environ)

# The local Prefect server's home (and its warm runner's socket) for anything the suite
# starts without naming one (`labkeeper serve` starts a runner there): a directory of
# this session's, never the user's ~/.local/state/labkeeper/prefect, where a runner
# left by a killed serve would outlive the suite.
if not os.environ.get("LABKEEPER_PREFECT_HOME"):
    import tempfile

    os.environ["LABKEEPER_PREFECT_HOME"] = tempfile.mkdtemp(prefix="lk-test-local-prefect-")

pytest_plugins = [
    "tests.fixtures.prefect",
    "tests.fixtures.ssh",
    "tests.fixtures.lab",
    "tests.fixtures.pvesim",
    "tests.fixtures.e2e",
    "tests.fixtures.receiver",
    "tests.fixtures.restic_matrix",
    "tests.fixtures.docker",
    "tests.fixtures.pg17",
    "tests.fixtures.multihost",
]
