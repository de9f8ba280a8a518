"""Hold the page server until the source guest is stopped, watching QMP.

With x-ignore-shared the source guest keeps running (and writing its RAM
file) until switch-over; a page served before it stops may be stale.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError

log = logging.getLogger(__name__)


def release_when_stopped(socket_path: Path, released: threading.Event) -> threading.Thread:
    """Start a thread that sets ``released`` once the guest behind ``socket_path`` stops."""
    thread = threading.Thread(target=lambda: asyncio.run(_watch(socket_path, released)), name="umemd-qmp",
                              daemon=True)
    thread.start()
    return thread


async def _watch(socket_path: Path, released: threading.Event) -> None:
    client = QMPClient("umemd-serve")
    try:
        await client.connect(str(socket_path))
    except (QMPError, OSError) as e:
        log.warning("cannot reach the source QEMU's QMP at %s (%s): it is gone, so its RAM file is final",
                    socket_path, e)
        released.set()
        return
    listener = EventListener(("STOP", "SHUTDOWN"))
    client.register_listener(listener)
    try:
        status = await client.execute("query-status")
        assert isinstance(status, dict)
        if status["running"]:
            log.info("holding every page until the source guest stops (QMP %s)", socket_path)
            event = await listener.get()
            log.info("source guest stopped (%s): serving pages", event["event"])
        else:
            log.info("source guest is %s: serving pages", status["status"])
    except (QMPError, OSError, EOFError) as e:
        log.warning("lost the source QEMU's QMP (%s): serving pages", e)
    finally:
        released.set()
        client.remove_listener(listener)
        await client.disconnect()
