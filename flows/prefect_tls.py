"""Prefect's API clients in one process share their TLS context while the API is plain
http (:func:`install`).

Every Prefect client (the flow engine's, the event and log workers', the server-version
check) builds its own ``ssl.create_default_context(cafile=...)``, and OpenSSL parses the
whole CA bundle each time: ≈15 ms of CPU on a quiet machine, four to five times in
every run, though a local ``http://`` server never uses it (issue 24). While the
configured API address is not ``https``, those call sites get one context per CA file
(reloaded when the file changes); a runner's child inherits the one its runner made
(:func:`warm`). Nothing changes for an ``https`` API (each client builds its own, as
before: httpcore sets protocol options on the context per connection) nor for the
unverified context ``PREFECT_API_TLS_INSECURE_SKIP_VERIFY`` asks for (made fresh each
time: Prefect turns it unverified after making it).
"""

from __future__ import annotations

import importlib
import logging
import os
import ssl
import threading
from typing import Any

logger = logging.getLogger(__name__)

PATCHED_MODULES = ("prefect.client.orchestration", "prefect._internal.version_checking")
"""Prefect's modules that build a client's context with ``ssl.create_default_context``."""

_cache: dict[tuple[Any, ...], ssl.SSLContext] = {}
_lock = threading.Lock()


def _api_is_plain_http() -> bool:
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url or ""
    return not url.lower().startswith("https:")


def _file_key(path: str | None) -> tuple[Any, ...]:
    if path is None:
        return (None,)
    try:
        st = os.stat(path)
    except OSError:
        return (path, None)  # ssl raises on it below, as it would have
    return (path, st.st_ino, st.st_size, st.st_mtime_ns)


class SharedContexts:
    """Stands in for the ``ssl`` module inside :data:`PATCHED_MODULES`: everything is
    ``ssl``'s, except that a verifying context for a CA file is made once while the
    API is plain http."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ssl, name)

    def create_default_context(self, purpose: ssl.Purpose = ssl.Purpose.SERVER_AUTH, *,
                               cafile: str | None = None, capath: str | None = None,
                               cadata: str | bytes | None = None) -> ssl.SSLContext:
        if cafile is None or capath is not None or cadata is not None \
                or not _api_is_plain_http():
            return ssl.create_default_context(purpose, cafile=cafile, capath=capath,
                                              cadata=cadata)
        key = (purpose, *_file_key(cafile))
        with _lock:
            ctx = _cache.get(key)
            if ctx is None:
                ctx = _cache[key] = ssl.create_default_context(purpose, cafile=cafile)
        return ctx


def install() -> None:
    """Point :data:`PATCHED_MODULES`' ``ssl`` at :class:`SharedContexts` (once; a module
    missing in this Prefect version is left alone, which only costs the CPU again)."""
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # pragma: no cover - another Prefect layout
            logger.debug("prefect_tls: %s not found; its clients build their own", name)
            continue
        if getattr(module, "ssl", None) is ssl:
            module.ssl = SharedContexts()  # type: ignore[attr-defined]


def warm() -> None:
    """Make the context Prefect's clients will ask for now (the runner and the
    forkserver call it before they fork: their children inherit it). Best effort: a CA
    file that cannot be read fails the clients that use it, as before, not this."""
    import certifi
    from prefect.settings import get_current_settings

    settings = get_current_settings().api
    if settings.tls_insecure_skip_verify:
        return
    try:
        SharedContexts().create_default_context(
            cafile=settings.ssl_cert_file or certifi.where())
    except (OSError, ssl.SSLError) as exc:
        logger.debug("prefect_tls: no shared context made ahead: %s", exc)
