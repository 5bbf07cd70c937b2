"""Connections reused per target within a flow run: :class:`SshPool`."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from types import TracebackType

from labkeeper.errors import SSHError
from labkeeper.ssh.client import SshClient
from labkeeper.ssh.connect import connect
from labkeeper.ssh.target import SshTarget


class SshPool:
    """Connections reused per target within a flow run; closes all on exit.

    ``get(target)`` returns the same connected client for the same target
    (targets are frozen and compare by value) and reconnects if the connection
    dropped. Thread-safe: concurrent first calls for one target connect once.
    """

    def __init__(self, connector: Callable[[SshTarget], SshClient] = connect) -> None:
        self._connector = connector
        self._clients: dict[SshTarget, SshClient] = {}
        self._locks: dict[SshTarget, threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = False
        self.connects = 0

    def get(self, target: SshTarget) -> SshClient:
        with self._lock:
            if self._closed:
                raise SSHError("the SSH pool is closed")
            lock = self._locks.setdefault(target, threading.Lock())
        with lock:
            client = self._clients.get(target)
            if client is not None and client.is_active:
                return client
            if client is not None:
                client.close()
            client = self._connector(target)
            with self._lock:
                self._clients[target] = client
                self.connects += 1
            return client

    def __len__(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients.values())
            self._clients.clear()
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()

    def __enter__(self) -> SshPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
