"""Feed the source's release gate (umemd.session) from the source QEMU's QMP.

A driver: it only turns what QEMU says into :class:`SourceEvent`\\ s; the
rules are in umemd.session. It listens for STOP, RESUME, SHUTDOWN and
MIGRATION events and polls ``query-migrate`` (MIGRATION events need the
``events`` capability, which umemd migrate sets; the poll catches the rest,
and ``pre-switchover`` lasts until ``migrate-continue``, so it is never
missed). A migration status that was already there when serve started
(the ``cancelled`` of an earlier attempt) is not an event of this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

from umemd.session import SourceEvent, SourceGate

log = logging.getLogger(__name__)

POLL = 0.2  # seconds between query-migrate polls
CONNECT_TIMEOUT = 10.0  # seconds for the source QEMU's QMP greeting

# query-migrate statuses of a migration in progress
IN_PROGRESS = frozenset({"setup", "active", "device", "wait-unplug", "pre-switchover", "cancelling",
                         "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup",
                         "colo"})
STATUS_EVENTS = {"pre-switchover": SourceEvent.PRE_SWITCHOVER, "completed": SourceEvent.COMPLETED,
                 "failed": SourceEvent.MIGRATION_FAILED, "cancelled": SourceEvent.MIGRATION_CANCELLED}
RUN_EVENTS = {"STOP": SourceEvent.STOPPED, "RESUME": SourceEvent.RESUMED, "SHUTDOWN": SourceEvent.QEMU_QUIT}


def watch_source(socket_path: Path, gate: SourceGate) -> threading.Event:
    """Start a thread that moves ``gate`` by what the QEMU behind ``socket_path`` does; the
    returned event is set once it watches (listening, the starting status read) or has given up."""
    watching = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(_watch(socket_path, gate, watching)), name="umemd-qmp",
                              daemon=True)
    thread.start()
    return watching


class _MigrationStatus:
    """Turns query-migrate statuses (polled or from MIGRATION events) into events, once each."""

    def __init__(self, gate: SourceGate) -> None:
        self.gate = gate
        self.last = ""
        self.in_progress_seen = False

    def start(self, status: str, running: bool) -> None:
        """The status found at connect time."""
        self.last = status
        if status in IN_PROGRESS:
            self.in_progress_seen = True
        if status == "pre-switchover" or (status == "completed" and not running):
            self.gate.handle(STATUS_EVENTS[status], f"found {status} at start-up")

    def update(self, status: str) -> None:
        if status == self.last:
            return
        self.last = status
        if status in IN_PROGRESS:
            self.in_progress_seen = True
        event = STATUS_EVENTS.get(status)
        if event is not None and (self.in_progress_seen or event is SourceEvent.PRE_SWITCHOVER):
            self.gate.handle(event, status)


async def _watch(socket_path: Path, gate: SourceGate, watching: threading.Event) -> None:
    client = QMPClient("umemd-serve")
    try:  # a monitor another client holds accepts and never greets: bounded
        await asyncio.wait_for(client.connect(str(socket_path)), CONNECT_TIMEOUT)
    except (QMPError, OSError, TimeoutError) as e:
        why = (f"no QMP greeting within {CONNECT_TIMEOUT:g} s: another client holds that monitor?"
               if isinstance(e, TimeoutError) else str(e))
        gate.handle(SourceEvent.QMP_LOST, f"cannot reach {socket_path} ({why}): pass the source QEMU's second QMP "
                    "monitor, or --guest-stopped-for-good if it has quit")
        watching.set()
        return
    listener = EventListener(("STOP", "RESUME", "SHUTDOWN", "MIGRATION"))
    client.register_listener(listener)
    migration = _MigrationStatus(gate)
    try:
        running = bool((await qmp_call(client, "query-status"))["running"])
        migration.start(await _migration_status(client), running)
        log.info("source QEMU at %s: guest %s, migration %s; %s", socket_path,
                 "running" if running else "paused", migration.last, gate.phase.value)
        watching.set()
        while not gate.aborted:
            with contextlib.suppress(TimeoutError):
                _on_event(await asyncio.wait_for(listener.get(), POLL), gate, migration)
                continue
            migration.update(await _migration_status(client))
    except (QMPError, OSError, EOFError) as e:
        gate.handle(SourceEvent.QMP_LOST, str(e) or type(e).__name__)
    finally:
        watching.set()
        client.remove_listener(listener)
        with contextlib.suppress(Exception):
            await client.disconnect()


def _on_event(event: Any, gate: SourceGate, migration: _MigrationStatus) -> None:
    name = str(event["event"])
    if name == "MIGRATION":
        migration.update(str(event["data"]["status"]))
    else:
        gate.handle(RUN_EVENTS[name], name)


async def qmp_call(qmp: QMPClient, command: str, args: dict[str, Any] | None = None) -> Any:
    """``qmp.execute`` with its result as ``Any`` (QMP returns JSON)."""
    return await qmp.execute(command, args)


async def _migration_status(client: QMPClient) -> str:
    return str((await qmp_call(client, "query-migrate")).get("status", "none"))
