"""The environment a child inherits: an allowlist of this process's variables.

Every ``env:`` secret of the worker stays behind; a caller adds what a command
needs through ``env=``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

BASE_ENV_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM",
    "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "RESTIC_CACHE_DIR",
    # libpq's file locations (never a secret itself): verify-full's root CA, ~/.pgpass
    "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY", "PGSSLCRL", "PGPASSFILE", "PGSERVICEFILE",
    "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "PYTHONPATH", "PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE", "VIRTUAL_ENV",
})
"""What a child inherits from this process's environment (plus ``LC_*``); everything
else (every ``env:`` secret of the worker) stays behind. A child gets what its caller
passes in ``env=`` on top. :data:`EXTRA_ENV_VARIABLE` names more to pass on."""
EXTRA_ENV_VARIABLE = "LABKEEPER_CHILD_ENV"
"""Comma-separated names of further variables children inherit (an operator's
escape hatch: ``LABKEEPER_CHILD_ENV=GOMAXPROCS,PGSSLROOTCERT``)."""


def inherited_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The part of ``environ`` (default: ``os.environ``) a child inherits."""
    environ = os.environ if environ is None else environ
    extra = {n.strip() for n in environ.get(EXTRA_ENV_VARIABLE, "").split(",") if n.strip()}
    return {k: v for k, v in environ.items()
            if k in BASE_ENV_NAMES or k.startswith("LC_") or k in extra}


def child_env(extra: Mapping[str, str] | None, base: Mapping[str, str] | None) -> dict[str, str]:
    env = inherited_env() if base is None else dict(base)
    if extra:
        env.update(extra)
    return env
