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
import itertools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.error import QMPError
from qemu.qmp.message import Message

from umemd.destination import PullState
from umemd.errors import ConnectError, UmemError
from umemd.qmpwatch import qmp_call
from umemd.status import MAX_LINE
from umemd.transport import Endpoint

log = logging.getLogger(__name__)

POLL = 0.1  # seconds between query-migrate polls
FINAL_PULL_STATES = frozenset(s.value for s in (PullState.COMPLETE, PullState.FAILED, PullState.ABORTED))


class MigrationError(UmemError):
    """The migration could not start or did not finish."""


@dataclass(frozen=True)
class QmpAddress:
    """A QMP socket: a Unix path, or HOST:PORT."""

    text: str

    def target(self) -> str | tuple[str, int]:
        host, sep, port = self.text.rpartition(":")
        if sep and port.isdigit() and "/" not in self.text:
            return host.strip("[]") or "127.0.0.1", int(port)
        return self.text

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


@dataclass
class Timeline:
    """What the pull daemon reported over time (seconds since ``migrate``)."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # event -> seconds since migrate

    def add(self, t: float, status: dict[str, Any]) -> None:
        self.samples.append({"t": round(t, 3), "present": status["present"], "faults": status["faults"],
                             "demand_pages": status["demand_pages"], "pushed_pages": status["pushed_pages"],
                             "zero_pages": status["zero_pages"],
                             "latency": status["fault_latency_us"]["histogram"]})


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
    return build_report(ready, last, src_info, dst_info, src_events, dst_events, started, finished, timeline)


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


def build_report(ready: dict[str, Any], last: dict[str, Any], src_info: dict[str, Any], dst_info: dict[str, Any],
                 src_events: EventClock, dst_events: EventClock, started: float, finished: float,
                 timeline: Timeline) -> dict[str, Any]:
    stop, resume = src_events.arrived.get("STOP"), dst_events.arrived.get("RESUME")
    ram = src_info.get("ram", {})
    return {
        "instance": ready["name"],
        "node": ready["node"],
        "migration_id": ready["migration_id"],
        "stop_resume_ms": round((resume - stop) * 1000, 1) if stop and resume else None,
        "total_s": round(finished - started, 3),
        "qemu": {"total_ms": src_info.get("total-time"), "setup_ms": src_info.get("setup-time"),
                 "ram_bytes": ram.get("transferred"), "ram_total": ram.get("total"),
                 "destination_status": dst_info.get("status")},
        "pages": {"total": last["pages"], "present": last["present"], "faults": last["faults"],
                  "demanded": last["demand_pages"], "pushed": last["pushed_pages"],
                  "zero_hints": last["zero_pages"], "already_present": last["skipped_pages"]},
        "bytes_received": last["bytes_received"],
        "reconnects": last["reconnects"],
        "daemon_attached": last["attached"],  # the pull that finished had restarted and attached
        "fault_latency_us": last["fault_latency_us"],
        "timeline": {"marks": {k: round(v, 3) for k, v in timeline.marks.items()}, "samples": timeline.samples},
    }


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


def summary(report: dict[str, Any]) -> str:
    p, q, lat = report["pages"], report["qemu"], report["fault_latency_us"]
    stop_resume = f"{report['stop_resume_ms']:.0f} ms" if report["stop_resume_ms"] is not None else "not seen"
    return "\n".join([
        f"migrated {report['instance']} ({p['total']} pages, {p['total'] * 4096 / 2**20:.0f} MiB, "
        f"migration {report['migration_id']})",
        f"  STOP->RESUME      {stop_resume}",
        f"  until last page   {report['total_s']:.2f} s",
        f"  migration stream  {q['ram_bytes']} bytes of RAM blocks (device state and ROMs; guest RAM moved by umem)",
        f"  pages             {p['demanded']} demanded by {p['faults']} faults, {p['pushed']} pushed, "
        f"{p['zero_hints']} zero hints (counted in those two), {p['already_present']} already present",
        f"  received          {report['bytes_received'] / 2**20:.1f} MiB, {report['reconnects']} reconnects",
        f"  fault latency     p50 {lat['p50'] / 1000:.2f} ms, p99 {lat['p99'] / 1000:.2f} ms "
        f"(power-of-two buckets; upper bounds)",
    ])


def terminal_progress() -> Callable[[str], None]:
    """A progress callback: a rewritten line on a terminal, a log line every 5 s otherwise."""
    if sys.stderr.isatty():
        def show(line: str) -> None:
            sys.stderr.write("\r" + line[:160] + "\033[K")
            sys.stderr.flush()
        return show
    last = [0.0]

    def log_line(line: str) -> None:
        if time.monotonic() - last[0] >= 5:
            last[0] = time.monotonic()
            log.info("%s", line)
    return log_line


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Pages present, faults per second and fault latency over time, as a PNG."""
    import matplotlib  # a slow import, only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, marks = report["timeline"]["samples"], report["timeline"]["marks"]
    total = report["pages"]["total"]
    t = [s["t"] for s in samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    ax1.plot(t, [100 * s["present"] / total for s in samples])
    ax1.set_ylabel("pages present (%)")
    rates, p50, p99 = interval_series(samples)
    ax2.step(t[1:], rates, where="pre")
    ax2.set_ylabel("faults / s")
    ax3.step(t[1:], [v / 1000 for v in p50], where="pre", label="p50")
    ax3.step(t[1:], [v / 1000 for v in p99], where="pre", label="p99")
    ax3.set_ylabel("fault latency (ms)")
    ax3.set_xlabel("seconds since migrate")
    ax3.legend()
    for ax in (ax1, ax2, ax3):
        for at in marks.values():
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
    for name, at in marks.items():
        ax1.annotate(name, (at, 100), rotation=90, fontsize=7, va="top")
    fig.suptitle(f"umem post-copy of {report['instance']}: STOP->RESUME {report['stop_resume_ms']} ms, "
                 f"last page at {report['total_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def interval_series(samples: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """Per interval between samples: faults per second and latency p50/p99 (µs, bucket upper
    bounds) of the faults served in it, from the difference of the cumulative histograms."""
    rates, p50, p99 = [], [], []
    for before, after in itertools.pairwise(samples):
        dt = max(after["t"] - before["t"], 1e-6)
        rates.append((after["faults"] - before["faults"]) / dt)
        diff = {k: n - before["latency"].get(k, 0) for k, n in after["latency"].items()}
        p50.append(_bucket_percentile(diff, 0.5))
        p99.append(_bucket_percentile(diff, 0.99))
    return rates, p50, p99


def _bucket_percentile(buckets: dict[str, int], fraction: float) -> float:
    count = sum(buckets.values())
    seen = 0
    for key in sorted(buckets, key=lambda k: int(k[1:-2])):
        seen += buckets[key]
        if count and seen >= fraction * count:
            return float(key[1:-2])
    return 0.0


# ---- the pull's status endpoint, client side (umemd.status) ------------------------


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
