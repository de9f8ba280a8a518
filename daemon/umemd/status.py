"""The pull daemon's status endpoint: progress as JSON lines over TCP, both ends.

``umemd pull --status HOST:PORT`` listens there (:class:`StatusServer`); whoever
connects (``umemd migrate --dst-status``: :func:`follow_status`) gets one JSON
object per line every :data:`INTERVAL` seconds, the document of
:func:`status_document` — the instance's name and node, the state
(:class:`PullState`), and the counters of :meth:`umemd.stats.PullStats.report` —
and a last line with ``"state": "complete"`` (or ``"failed"``, ``"aborted"``)
before the daemon exits; :meth:`StatusServer.update` sends a line at once
between two (the source's release: umemd migrate waits for it with the source
stopped). It is read-only: nothing a client sends is read. See
docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from umemd.device import Server, node_path
from umemd.errors import ConnectError, DeviceError, UmemError
from umemd.transport import Endpoint

if TYPE_CHECKING:
    from umemd.destination import Puller

log = logging.getLogger(__name__)

INTERVAL = 0.25  # seconds between status lines
SEND_TIMEOUT = 2.0  # a client that reads slower than this is dropped
MAX_CLIENTS = 16  # more are refused at accept
MAX_LINE = 1 << 20

Snapshot = Callable[[], dict[str, Any]]


class PullState(enum.Enum):
    """The pull's state, as the status endpoint and umemd migrate see it."""

    READY = "ready"  # the instance exists and faults are collected; no source yet
    PULLING = "pulling"  # a source is connected
    COMPLETE = "complete"  # every page is present; the node is destroyed
    FAILED = "failed"  # the pull ended with an error
    ABORTED = "aborted"  # the source aborted the migration: this instance must not be used
    SOURCE_LOST = "source_lost"  # no page server for --source-timeout: the instance stays, to attach to


FINAL_PULL_STATES = frozenset(s.value for s in (PullState.COMPLETE, PullState.FAILED, PullState.ABORTED))


def present_pages(server: Server) -> int:
    """Pages present, or -1 if the instance cannot say (e.g. its device failed)."""
    try:
        return server.stats().present
    except DeviceError:
        return -1


def status_document(puller: Puller, state: PullState, present: int | None = None) -> dict[str, object]:
    """One line of the status endpoint."""
    if present is None:
        present = present_pages(puller.server)
    return {"time": time.time(), "name": puller.server.name, "node": str(node_path(puller.server.name)),
            "migration_id": puller.server.tag.hex(), "state": state.value, "source_released": puller.source_released,
            "source_lost_since": puller.source_lost_since, **puller.stats.report(present)}


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
            refusal = self._refusal()
            if refusal:
                log.warning("status client %s:%d refused: %s", peer[0], peer[1], refusal)
                client.close()
                return
            self._clients.append(client)
        log.info("status client %s:%d connected", *peer[:2])

    def _refusal(self) -> str:
        """Why a new client is refused, or "" (caller holds _lock)."""
        if self._final:
            return "the pull has ended and its last status line is sent"
        if len(self._clients) >= MAX_CLIENTS:
            return f"{MAX_CLIENTS} clients already"
        return ""

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


# ---- the client side -------------------------------------------------------------


async def read_status(endpoint: Endpoint, on_line: Callable[[dict[str, Any]], None], *,
                      deadline: float) -> dict[str, Any]:
    """Follow a pull daemon's status until it says ``complete`` or ``failed``, calling
    ``on_line`` with every line; returns the last one."""
    return await follow_status(endpoint, lambda doc: doc.get("state") in FINAL_PULL_STATES, deadline, on_line)


async def first_status(endpoint: Endpoint, timeout: float,
                       until: Callable[[dict[str, Any]], bool] = lambda doc: True) -> dict[str, Any]:
    """The first status line of the daemon at ``endpoint`` for which ``until`` holds (by default
    any: the daemon is up and holds its instance), within ``timeout`` seconds."""
    return await follow_status(endpoint, until, time.monotonic() + timeout)


async def follow_status(endpoint: Endpoint, until: Callable[[dict[str, Any]], bool], deadline: float,
                        on_line: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Read status lines, reconnecting with backoff (the daemon may be restarted), until one
    satisfies ``until``; ConnectError at ``deadline`` (monotonic), naming what was seen."""
    last: dict[str, Any] = {}
    last_error: BaseException | None = None
    backoff = 0.1
    import asyncio  # here, not at the top: the pull's start-up does not pay for it (umemd.cli)

    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(endpoint.host, endpoint.port, limit=MAX_LINE), 5)
            try:
                while line := await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic())):
                    last = json.loads(line)
                    backoff = 0.1
                    if on_line:
                        on_line(last)
                    if until(last):
                        return last
            finally:
                writer.close()
            last_error = EOFError("closed without a status line")
        except (OSError, TimeoutError, ValueError) as e:
            last_error = e
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 2.0)
    if last:
        raise ConnectError(f"umemd pull at {endpoint} is still {last.get('state')!r} at the deadline")
    raise ConnectError(f"no umemd pull status at {endpoint} in time ({last_error}): start "
                       f"`umemd pull NAME --size SIZE --status {endpoint} ...` on the destination first")
