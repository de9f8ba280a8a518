"""The pull daemon's status endpoint: progress as JSON lines over TCP.

``umemd pull --status HOST:PORT`` listens there; whoever connects (``umemd
migrate --dst-status``) gets one JSON object per line every
:data:`INTERVAL` seconds — the instance's name and node, the state, and the
counters of :meth:`umemd.stats.PullStats.report` — and a last line with
``"state": "complete"`` (or ``"failed"``, ``"aborted"``) before the daemon
exits; :meth:`StatusServer.update` sends a line at once between two (the
source's release: umemd migrate waits for it with the source stopped). It is
read-only: nothing a client sends is read. See docs/protocol.md; the client
side is in umemd.migrate. The states are umemd.destination.PullState.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from umemd.errors import ConnectError, UmemError
from umemd.transport import Endpoint

log = logging.getLogger(__name__)

INTERVAL = 0.25  # seconds between status lines
SEND_TIMEOUT = 2.0  # a client that reads slower than this is dropped
MAX_CLIENTS = 16  # more are refused at accept
MAX_LINE = 1 << 20

Snapshot = Callable[[], dict[str, Any]]


class StatusServer(threading.Thread):
    """Broadcasts ``snapshot()`` to every connected client until :meth:`finish`."""

    def __init__(self, endpoint: Endpoint, snapshot: Snapshot) -> None:
        super().__init__(name="umemd-status", daemon=True)
        self.snapshot = snapshot
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()  # _clients and _final: the status thread and update()'s caller
        self._finished = threading.Event()
        self._final = False  # the last line is sent: nothing may follow it
        try:
            self._listener = socket.create_server((endpoint.host, endpoint.port), reuse_port=False)
        except OSError as e:
            raise ConnectError(f"cannot listen for status clients on {endpoint}: {e.strerror or e}") from e
        self._listener.settimeout(INTERVAL)

    def run(self) -> None:
        while not self._finished.is_set():
            self._accept()
            try:
                doc = self.snapshot()
            except (UmemError, OSError) as e:  # the instance went away under us: the end is near
                log.debug("status snapshot failed: %s", e)
                continue
            self._broadcast(doc)

    def update(self) -> None:
        """Send a line now (from any thread), not only at the next interval."""
        with contextlib.suppress(UmemError, OSError):
            self._broadcast(self.snapshot())

    def finish(self, last: dict[str, Any]) -> None:
        """Send ``last`` to every client, close them and stop: no line can follow it."""
        self._finished.set()
        self._broadcast(last, final=True)
        with self._lock:
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.shutdown(socket.SHUT_WR)
                client.close()
            self._clients.clear()
        self.join(INTERVAL * 4)
        self._listener.close()

    def _accept(self) -> None:
        try:
            client, peer = self._listener.accept()
        except TimeoutError:
            return
        except OSError:
            self._finished.wait(INTERVAL)
            return
        client.settimeout(SEND_TIMEOUT)
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS or self._final:
                log.warning("status client %s:%d refused: %d clients already", peer[0], peer[1], MAX_CLIENTS)
                client.close()
                return
            self._clients.append(client)
        log.info("status client %s:%d connected", *peer[:2])

    def _broadcast(self, doc: dict[str, Any], final: bool = False) -> None:
        line = json.dumps(doc, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            if self._final:
                return
            self._final = final
            for client in list(self._clients):
                try:
                    client.sendall(line)
                except OSError as e:
                    log.info("status client dropped: %s", e)
                    self._clients.remove(client)
                    client.close()
