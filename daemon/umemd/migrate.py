"""``umemd migrate``: one post-copy migration, driven from anywhere.

Talks to the source and destination QEMUs over QMP (``qemu.qmp``) and to the
destination's ``umemd pull`` through its status endpoint (umemd.status); it
starts nothing itself. The order (BRIEF §4, docs/operations.md):

1. the pull daemon answers on its status endpoint (it holds the instance and
   collects faults), a page server is connected to it, and the destination
   QEMU maps that instance's node and waits in ``inmigrate`` (``-incoming
   defer``);
2. ``x-ignore-shared`` on both sides (``-postcopy`` sets it; set here when it
   is not), ``postcopy-ram`` off: guest RAM is not on the migration stream;
3. ``pause-before-switchover`` on the source; ``migrate-incoming`` on the
   destination, then ``migrate`` on the source, which stops its guest for
   good and waits in ``pre-switchover``: there the page server (``umemd
   serve --qmp``) releases its pages and says RELEASED to the pull;
4. only once the pull's status confirms the release, ``migrate-continue``;
   both QEMUs ``completed``, the destination's RESUME, then ``quit`` on the
   source QEMU (unless ``--keep-source``: it must never run again, or its
   guest and the destination's would diverge), then the pull's last page.

Anything that goes wrong before the destination's RESUME cancels the
migration (``migrate_cancel``): the source guest runs on, the page server
aborts, and the pull refuses the instance.

STOP→RESUME is measured between the arrivals of the source's ``STOP`` and the
destination's ``RESUME`` events here (one clock, whatever the two hosts'
clocks say); the total from ``migrate`` to the pull's ``complete`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.message import Message

from umemd.errors import ConnectError, MigrationError, UmemError
from umemd.qmpwatch import qmp_call
from umemd.report import Timeline, build_report
from umemd.status import FINAL_PULL_STATES, PullState, first_status, read_status
from umemd.transport import Endpoint

log = logging.getLogger(__name__)

POLL = 0.1  # seconds between query-migrate polls


@dataclass(frozen=True)
class QmpAddress:
    """A QMP socket: a Unix path, or HOST:PORT."""

    text: str

    def target(self) -> str | tuple[str, int]:
        if "/" in self.text:
            return self.text
        try:
            endpoint = Endpoint.parse(self.text)
        except UmemError:  # not HOST:PORT: a path
            return self.text
        return endpoint.host, endpoint.port

    def __str__(self) -> str:
        return self.text


@dataclass
class MigrateOptions:
    src_qmp: QmpAddress
    dst_qmp: QmpAddress
    dst_status: Endpoint
    uri: str            # the destination's migration address, as the source reaches it
    incoming: str       # the address the destination listens on (migrate-incoming)
    ready_timeout: float = 30.0
    release_timeout: float = 120.0
    timeout: float = 3600.0
    keep_source: bool = False
    progress: Callable[[str], None] | None = None


class EventClock(EventListener):
    """The arrival (``time.monotonic()``) of each QMP event of interest, first one only."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(names)
        self.arrived: dict[str, float] = {}

    def accept(self, event: Message) -> bool:
        name = str(event["event"])
        if name in self.names:
            self.arrived.setdefault(name, time.monotonic())
        return False


async def connect_qmp(name: str, address: QmpAddress, what: str) -> QMPClient:
    client = QMPClient(name)
    try:
        await asyncio.wait_for(client.connect(address.target()), 10)
    except (QMPError, OSError, TimeoutError) as e:
        raise MigrationError(f"cannot reach the {what} QEMU's QMP at {address} ({e}): start it with "
                             f"-qmp unix:PATH,server=on,wait=off (or tcp:HOST:PORT,...) and pass that") from e
    return client


async def check_destination_maps(dst: QMPClient, node: str) -> None:
    """The destination QEMU's RAM must be the node the pull daemon serves."""
    paths = []
    for memdev in await qmp_call(dst, "query-memdev"):
        with contextlib.suppress(QMPError):
            paths.append(await dst.execute("qom-get", {"path": f"/objects/{memdev['id']}", "property": "mem-path"}))
    if node not in paths:
        raise MigrationError(f"the destination QEMU's RAM ({', '.join(map(str, paths)) or 'no file backend'}) is "
                             f"not {node}, the instance umemd pull serves: start QEMU with -object "
                             f"memory-backend-file,mem-path={node},share=on,postcopy-device=on")


async def ensure_capabilities(qmp: QMPClient, side: str, *extra: str) -> None:
    caps = {c["capability"]: c["state"] for c in await qmp_call(qmp, "query-migrate-capabilities")}
    if caps.get("postcopy-ram"):
        raise MigrationError(f"the {side} QEMU has postcopy-ram on: umem moves RAM outside QEMU; turn it off "
                             f"(migrate-set-capabilities) or start QEMU with -postcopy and nothing else")
    wanted = [{"capability": c, "state": True} for c in ("x-ignore-shared", "events", *extra) if not caps.get(c)]
    if wanted:
        await qmp.execute("migrate-set-capabilities", {"capabilities": wanted})


async def wait_completed(qmp: QMPClient, side: str, deadline: float, until: str = "completed") -> dict[str, Any]:
    while True:
        info: dict[str, Any] = await qmp_call(qmp, "query-migrate")
        status = info.get("status", "none")
        if status == until:
            return info
        if status in ("failed", "cancelled"):
            raise MigrationError(f"the {side} QEMU reports the migration {status}: "
                                 f"{info.get('error-desc', 'no reason given')}")
        if time.monotonic() > deadline:
            raise MigrationError(f"the {side} QEMU's migration is still {status!r} at the deadline")
        await asyncio.sleep(POLL)


async def migrate(opts: MigrateOptions) -> dict[str, Any]:
    """Run the migration; return its report (see docs/operations.md)."""
    ready = await first_status(opts.dst_status, opts.ready_timeout)
    if ready.get("state") not in (PullState.READY.value, PullState.PULLING.value):
        raise MigrationError(f"umemd pull at {opts.dst_status} is {ready.get('state')!r}, not ready: "
                             f"start a fresh one for this migration")
    try:  # the page server connected: the destination's device load will find its pages
        ready = await first_status(opts.dst_status, opts.ready_timeout,
                                   lambda doc: doc["state"] != PullState.READY.value
                                   and not doc.get("source_lost_since"))
    except ConnectError as e:
        raise MigrationError(f"{e}: no page server is connected to it; start `umemd serve RAMFILE --connect "
                             f"DEST:PORT --qmp SOCKET ...` on the source (or check its log)") from e
    if ready["state"] != PullState.PULLING.value:
        raise MigrationError(f"umemd pull at {opts.dst_status} ended {ready['state']!r} before the migration: "
                             f"see its log")
    clients: list[QMPClient] = []
    try:
        src = await connect_qmp("umemd-migrate-src", opts.src_qmp, "source")
        clients.append(src)
        dst = await connect_qmp("umemd-migrate-dst", opts.dst_qmp, "destination")
        clients.append(dst)
        src_events, dst_events = EventClock(("STOP",)), EventClock(("RESUME",))
        src.register_listener(src_events)
        dst.register_listener(dst_events)
        return await _run(opts, src, dst, ready, src_events, dst_events)
    except QMPError as e:
        raise MigrationError(f"QMP: {e}") from e
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.disconnect()


async def _run(opts: MigrateOptions, src: QMPClient, dst: QMPClient, ready: dict[str, Any],
               src_events: EventClock, dst_events: EventClock) -> dict[str, Any]:
    src_state = (await qmp_call(src, "query-status"))["status"]
    dst_state = (await qmp_call(dst, "query-status"))["status"]
    if src_state not in ("running", "paused"):
        raise MigrationError(f"the source guest is {src_state!r}: nothing to migrate")
    if dst_state != "inmigrate":
        raise MigrationError(f"the destination QEMU is {dst_state!r}, not waiting for a migration: "
                             f"start it with -incoming defer")
    await check_destination_maps(dst, ready["node"])
    await ensure_capabilities(src, "source", "pause-before-switchover")
    await ensure_capabilities(dst, "destination")
    say = opts.progress or (lambda line: None)

    timeline = Timeline()
    await dst.execute("migrate-incoming", {"uri": opts.incoming})
    started = time.monotonic()
    deadline = started + opts.timeout
    await src.execute("migrate", {"uri": opts.uri})
    log.info("migrating %s (%d pages, migration %s) to %s", ready["name"], ready["pages"], ready["migration_id"],
             opts.uri)

    def on_status(status: dict[str, Any]) -> None:
        timeline.add(time.monotonic() - started, status)
        say(progress_line(status, src_events, dst_events))

    pulled = asyncio.create_task(read_status(opts.dst_status, on_status, deadline=deadline))
    try:
        try:
            src_info, dst_info = await _switch_over(opts, src, dst, dst_events, timeline, started, deadline)
        except BaseException:
            await _cancel(src, dst_events)
            raise
        if not opts.keep_source:
            await _quit_source(src)
            timeline.marks["source quit"] = time.monotonic() - started
        last = await pulled
    finally:
        pulled.cancel()
    finished = time.monotonic()
    if last.get("state") != PullState.COMPLETE.value:
        raise MigrationError(f"umemd pull ended {last.get('state')!r} with {last.get('present')} of "
                             f"{last.get('pages')} pages present: see its log")
    for name, t in (*src_events.arrived.items(), *dst_events.arrived.items()):
        timeline.marks[name] = t - started
    return build_report(ready, last, src_info, dst_info, src_events.arrived.get("STOP"),
                        dst_events.arrived.get("RESUME"), started, finished, timeline)


def progress_line(status: dict[str, Any], src_events: EventClock, dst_events: EventClock) -> str:
    phase = ("running on the destination" if "RESUME" in dst_events.arrived
             else "switching over" if "STOP" in src_events.arrived else "migrating device state")
    lat = status["fault_latency_us"]
    lost = status.get("source_lost_since")
    return (f"{phase}: {status['present']}/{status['pages']} pages "
            f"({100 * status['present'] / max(status['pages'], 1):5.1f}%), {status['faults']} faults, "
            f"latency p50 {lat['p50'] / 1000:.1f} ms p99 {lat['p99'] / 1000:.1f} ms, "
            f"{status['reconnects']} reconnects"
            + (f"; source lost since {time.strftime('%H:%M:%S', time.localtime(lost))} "
               f"({status['time'] - lost:.0f} s)" if lost else ""))


async def _switch_over(opts: MigrateOptions, src: QMPClient, dst: QMPClient, dst_events: EventClock,
                      timeline: Timeline, started: float, deadline: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """From ``migrate`` to the destination's RESUME: the source stops at pre-switchover, the
    page server releases, the pull confirms, then migrate-continue."""
    await wait_completed(src, "source", deadline, until="pre-switchover")
    timeline.marks["source pre-switchover"] = time.monotonic() - started
    await wait_release(opts.dst_status, opts.release_timeout)
    timeline.marks["release confirmed"] = time.monotonic() - started
    await src.execute("migrate-continue", {"state": "pre-switchover"})
    src_info = await wait_completed(src, "source", deadline)
    timeline.marks["source completed"] = time.monotonic() - started
    dst_info = await wait_completed(dst, "destination", deadline)
    timeline.marks["destination completed"] = time.monotonic() - started
    while "RESUME" not in dst_events.arrived:
        if (await qmp_call(dst, "query-status"))["running"]:
            break
        if time.monotonic() > deadline:
            raise MigrationError("the destination guest did not resume by the deadline")
        await asyncio.sleep(POLL)
    return src_info, dst_info


async def wait_release(endpoint: Endpoint, timeout: float) -> None:
    """Until the pull's status says the page server released; MigrationError if it does not
    within ``timeout`` or the pull ends first (serve aborted: no need to wait any longer)."""
    try:
        doc = await first_status(endpoint, timeout, lambda doc: bool(doc.get("source_released"))
                                 or doc.get("state") in FINAL_PULL_STATES)
    except ConnectError as e:
        raise MigrationError(f"{e}: the page server did not release the source's pages within {timeout:.0f} s "
                             "of pre-switchover; is `umemd serve --qmp` watching this source QEMU? "
                             "(migration cancelled)") from e
    if not doc.get("source_released"):
        raise MigrationError(f"umemd pull at {endpoint} ended {doc.get('state')!r} before the page server "
                             "released: see both daemons' logs (migration cancelled)")


async def _cancel(src: QMPClient, dst_events: EventClock) -> None:
    """Before the destination's RESUME the source guest is the one to keep: cancel, so it runs on
    (the page server then aborts and the pull refuses its instance)."""
    if "RESUME" in dst_events.arrived:
        return
    with contextlib.suppress(Exception):
        await src.execute("migrate_cancel")
        log.error("migration cancelled: the source guest runs on")


async def _quit_source(src: QMPClient) -> None:
    """The destination guest runs: the source must never run again."""
    with contextlib.suppress(Exception):
        await src.execute("quit")
    log.info("the destination guest runs; the source QEMU has quit (its RAM file keeps the pages)")
