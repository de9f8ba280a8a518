"""The source page server (``umemd serve``).

Serves the RAM file of the stopped source guest to one destination over
two channels: demand (each requested page first, then a few pages after
it) and push (every other page: the pages after recent faults first, then
the rest in order; holes and all-zero chunks as ZERO hints). Nothing is
read from the RAM file, not even its holes, before the release
(umemd.session: the source QEMU at pre-switchover), and every link says
RELEASED before its first page; with x-ignore-shared the source guest runs
until the switch-over, so a page (or a hole) read earlier may be stale. An
abort (the source guest runs again, the migration is cancelled or fails)
sends ERROR ABORTED on every link and ends the server with an error.

Threads: one per channel (``umemd-demand``, ``umemd-push``, each owning its
link) and the QMP watcher (umemd.qmpwatch), which moves the gate. What to send
next is the planner's (umemd.planner, its own lock). ``_lock`` guards the
extents and ``_links``; the stats counters are
each written by one channel thread only (demand_* by demand, pushed_pages
by push; zero_pages and bytes_sent by both, under ``_lock``).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field

from umemd.errors import (
    AuthenticationError,
    ConnectError,
    MigrationAbortedError,
    MigrationMismatchError,
    ProtocolError,
    RemoteProtocolError,
    UmemError,
)
from umemd.planner import PREPAGE, PushPlanner
from umemd.priority import favour_this_thread
from umemd.protocol import (
    MAX_RUN_PAGES,
    PAGE_SIZE,
    Channel,
    Closed,
    Complete,
    ErrorCode,
    Event,
    Have,
    PeerError,
    PushPhase,
    Request,
    State,
)
from umemd.ramfile import RamFile
from umemd.session import SourceGate, SourcePhase
from umemd.transport import Dialer, Link

log = logging.getLogger(__name__)

ABORT_SEND_WAIT = 2.0  # seconds an abort waits to tell each link
ZERO_RUN_MIN = 4  # zero pages in a row, inside data, sent as a ZERO hint rather than as data


@dataclass
class SourceStats:
    demand_requests: int = 0
    demand_pages: int = 0
    pushed_pages: int = 0
    zero_pages: int = 0
    bytes_sent: int = 0
    sessions: dict[str, int] = field(default_factory=lambda: {"demand": 0, "push": 0})


class PageServer:
    """Serves one RAM file to one destination until it reports COMPLETE."""

    def __init__(self, ram: RamFile, dialer: Dialer, gate: SourceGate, *, prepage: int = PREPAGE,
                 push_rate: float | None = None) -> None:
        self.ram = ram
        self.push_rate = push_rate  # bytes per second, None: as fast as the link goes
        self.dialer = dialer
        self.gate = gate
        self.stats = SourceStats()
        self.complete = threading.Event()  # the destination has every page
        self.failure: UmemError | None = None  # why serving cannot go on (set once, before _over)
        self._over = threading.Event()  # complete or failed: run() returns
        self._extents: list[tuple[int, int]] | None = None  # read once, after the release
        self._extent_starts: list[int] = []
        self.plan = PushPlanner(ram.pages, prepage=prepage)
        self._links: set[Link] = set()  # the links open now, to tell of an abort
        self._abort_told = threading.Event()  # an abort has told every link and set the failure
        self._lock = threading.Lock()

    def on_phase(self, phase: SourcePhase, reason: str) -> None:
        """The gate's callback (on the QMP watcher's thread)."""
        if phase is SourcePhase.RELEASED:
            log.info("released: %s; serving pages", reason)
        elif phase is SourcePhase.ABORTED:
            self._abort(reason)

    def _abort(self, reason: str) -> None:
        log.error("migration aborted: %s; serving nothing more", reason)
        error = MigrationAbortedError(f"the migration was aborted: {reason}; the destination refuses "
                                      "this instance, and a retry needs a new --migration-id")
        with self._lock:
            if self.failure is None:
                self.failure = error
            links = list(self._links)
        for link in links:  # a last word each, not waiting long on a peer that does not read
            link.try_send_frame(ABORT_SEND_WAIT, link.conn.error_frame, ErrorCode.ABORTED,
                                f"the source aborted the migration: {reason}")
            link.shutdown()
        self._abort_told.set()
        self._over.set()

    def run(self) -> int:
        """Serve until the destination has every page; 0 then.

        An abort wins over a COMPLETE that races it: once the gate has
        aborted, serve ends with the abort (after telling the links), even if
        the destination said it has every page meanwhile."""
        threads = [threading.Thread(target=self._channel_loop, args=(channel,), name=f"umemd-{channel.name.lower()}",
                                    daemon=True) for channel in Channel]
        for t in threads:
            t.start()
        self._over.wait()
        if self.gate.aborted:
            self._abort_told.wait()  # the gate's callback is on its way: at most ABORT_SEND_WAIT per link
        if self.failure is not None:
            raise self.failure
        log.info("destination has every page: %d sent on demand, %d pushed, %d as zero hints",
                 self.stats.demand_pages, self.stats.pushed_pages, self.stats.zero_pages)
        return 0

    def _channel_loop(self, channel: Channel) -> None:
        serve = self._serve_demand if channel is Channel.DEMAND else self._serve_push
        while not self._over.is_set():
            try:
                link = self.dialer.link(channel)
            except (MigrationMismatchError, AuthenticationError) as e:
                self._give_up(e)
                return
            except ConnectError:
                return
            self.stats.sessions[channel.name.lower()] += 1
            with self._lock:
                self._links.add(link)
            try:
                if self.gate.aborted:
                    self._abort(self.gate.reason)
                    return
                link.send_frame(link.conn.send_info, self.ram.size)
                serve(link)
            except MigrationAbortedError:
                return
            except ProtocolError as e:
                log.error("%s channel from %s: %s; closing it", channel.name.lower(), link.peer, e)
                with contextlib.suppress(OSError):
                    link.flush()
            except OSError as e:
                log.warning("%s channel to %s lost: %s", channel.name.lower(), link.peer, e)
            except Exception:
                log.exception("%s channel: unexpected error (a bug); dropping the connection",
                              channel.name.lower())
            finally:
                with self._lock:
                    self._links.discard(link)
                link.close()

    def _await_release(self, link: Link) -> None:
        """Block until the release, then say RELEASED on ``link`` (once); raises on an abort."""
        if link.conn.state is State.RELEASED:
            return
        if not self.gate.wait_released():
            raise MigrationAbortedError(self.gate.reason)
        link.send_frame(link.conn.send_released)

    # ---- demand ---------------------------------------------------------------

    def _serve_demand(self, link: Link) -> None:
        favour_this_thread()
        for event in link.events():
            if isinstance(event, Request):
                self._await_release(link)
                self.stats.demand_requests += 1
                for offset in event.offsets:
                    self._send_demand(link, offset // PAGE_SIZE)
            elif isinstance(event, PeerError | Closed):
                self._log_end(link, event)
                return

    def _send_demand(self, link: Link, page: int) -> None:
        """The requested page and the pages the planner pre-pages after it."""
        start, end = self.plan.demand(page)
        self.stats.demand_pages += self._send_range(link, start, end)

    # ---- push -----------------------------------------------------------------

    def _serve_push(self, link: Link) -> None:
        sent = bytearray(self.ram.pages)
        backlog: collections.deque[Event] = collections.deque()
        # The codec checks the HAVE runs' order and ends the cover as it parses the last one,
        # so events parsed with it (that HAVE, a COMPLETE behind it) are still in the backlog.
        while link.conn.push_phase is PushPhase.COVER or (backlog and isinstance(backlog[0], Have)):
            event = backlog.popleft() if backlog else None
            if event is None:
                backlog.extend(link.receive())
                continue
            if isinstance(event, PeerError | Closed):
                self._log_end(link, event)
                return
            if isinstance(event, Have):
                sent[event.first:event.first + event.count] = _bits_to_bytes(event.bitmap, event.count)
        link.pending[:0] = backlog  # what came after the last HAVE (a COMPLETE): read during the push
        self.plan.cover(bytes(sent))
        log.info("push channel: the destination has %d pages; pushing the other %d",
                 self.ram.pages - sent.count(0), sent.count(0))
        self._await_release(link)
        pushed, end = self._push_all(link)
        self.stats.pushed_pages += pushed
        if end is None:
            link.send_frame(link.conn.send_done, pushed, self.stats.zero_pages)
            log.info("push stream done: %d pages pushed", pushed)
            end = next((e for e in link.events() if isinstance(e, Complete | PeerError | Closed)), Closed())
        elif isinstance(end, Complete):
            log.info("push stream stopped after %d pages: the destination needs no more", pushed)
        else:
            log.info("push stream interrupted after %d pages", pushed)
        if isinstance(end, Complete):
            if not self.gate.aborted:  # else the abort ends the server, with its error
                self.complete.set()
                self._over.set()
        else:
            self._log_end(link, end)

    def _push_all(self, link: Link) -> tuple[int, Complete | PeerError | Closed | None]:
        """Push every page not sent yet: the pages after recent faults first
        (pre-paging), then the rest in order.

        Returns the pages pushed and None, or, if the destination said
        COMPLETE (it has every page, e.g. from faults) or went away before
        the push was through, that event.
        """
        pushed = 0
        started = time.monotonic()
        while True:
            ahead = pushed * PAGE_SIZE / self.push_rate - (time.monotonic() - started) if self.push_rate else 0.0
            if (stop := self._push_interrupted(link, ahead)) is not None:
                return pushed, stop
            run = self.plan.next_push()
            if run is None:
                return pushed, None
            pushed += self._send_range(link, *run)

    def _push_interrupted(self, link: Link, wait: float) -> Complete | PeerError | Closed | None:
        """Between two push frames: what the destination said on the push
        channel, waiting up to ``wait`` seconds (the rate cap) for it; None if
        nothing, and the push goes on. A capped push must not outlive a
        destination that already has every page."""
        deadline = time.monotonic() + wait
        while not self.complete.is_set():
            for event in link.poll(max(0.0, deadline - time.monotonic())):
                if isinstance(event, Complete | PeerError | Closed):
                    return event
                raise RemoteProtocolError(f"{type(event).__name__} on the push channel during the push")
            if time.monotonic() >= deadline:
                return None
        return Complete()

    # ---- sending pages ------------------------------------------------------------

    def _send_range(self, link: Link, start: int, end: int) -> int:
        """Send pages [start, end) as PAGES and ZERO frames; returns pages sent as data."""
        data_pages = 0
        for extent_lo, extent_hi, in_data in self._runs(start, end):
            for lo, hi, is_data in zero_split(self.ram, extent_lo, extent_hi) if in_data else [
                    (extent_lo, extent_hi, False)]:
                if is_data:
                    self._send_pages(link, lo, hi)
                    data_pages += hi - lo
                else:
                    link.send_frame(link.conn.send_zero, lo * PAGE_SIZE, hi - lo)
                    with self._lock:
                        self.stats.zero_pages += hi - lo
        return data_pages

    def _send_pages(self, link: Link, lo: int, hi: int) -> None:
        for run in range(lo, hi, MAX_RUN_PAGES):
            count = min(MAX_RUN_PAGES, hi - run)
            sent = link.send_frame(link.conn.send_pages, run * PAGE_SIZE,
                                   self.ram.view[run * PAGE_SIZE:(run + count) * PAGE_SIZE])
            with self._lock:
                self.stats.bytes_sent += sent

    def _data_extents(self) -> list[tuple[int, int]]:
        """The RAM file's data extents, read at the first use after the release: until
        the guest stops it may write into what is a hole now."""
        if not self.gate.released:
            raise MigrationAbortedError(f"a page was about to be read while the source is {self.gate.phase.value}: "
                                        "refusing")
        with self._lock:
            if self._extents is None:
                self._extents = list(self.ram.data_extents())
                self._extent_starts = [start for start, _ in self._extents]
            return self._extents

    def _runs(self, start: int, end: int) -> list[tuple[int, int, bool]]:
        """Split [start, end) into (lo, hi, is_data) runs by the file's data extents."""
        extents = self._data_extents()
        runs = []
        position = start * PAGE_SIZE
        stop = end * PAGE_SIZE
        i = max(0, bisect.bisect_right(self._extent_starts, position) - 1)
        while position < stop:
            if i < len(extents) and extents[i][1] <= position:
                i += 1
                continue
            ext_start, ext_end = extents[i] if i < len(extents) else (self.ram.size, self.ram.size)
            if position < ext_start:
                hole_end = min(ext_start, stop)
                runs.append((position // PAGE_SIZE, hole_end // PAGE_SIZE, False))
                position = hole_end
            else:
                data_end = min(ext_end, stop)
                runs.append((position // PAGE_SIZE, data_end // PAGE_SIZE, True))
                position = data_end
        return runs

    def _give_up(self, error: UmemError) -> None:
        if self.failure is None:
            self.failure = error
        self._over.set()

    def _log_end(self, link: Link, event: PeerError | Closed) -> None:
        if isinstance(event, PeerError):
            level = logging.INFO if event.code == ErrorCode.SHUTDOWN else logging.ERROR
            log.log(level, "%s channel: the destination says: %s", link.channel.name.lower(), event.reason)
            if event.code == ErrorCode.SIZE_MISMATCH:  # no retry can fix that: say what would
                self._give_up(UmemError(f"the destination's instance is not {self.ram.size} bytes, the size of "
                                        f"{self.ram.path}: serve this guest's RAM file, or give umemd pull the "
                                        "guest's --size"))
        else:
            log.info("%s channel: the destination closed the connection", link.channel.name.lower())


def zero_split(ram: RamFile, lo: int, hi: int) -> list[tuple[int, int, bool]]:
    """Pages [lo, hi) of a data extent as (lo, hi, is_data) runs: stretches of at least
    ZERO_RUN_MIN zero pages apart (QEMU checks page by page too); shorter ones ride along with
    the data around them, so runs stay long."""
    if ram.is_zero(lo * PAGE_SIZE, (hi - lo) * PAGE_SIZE):
        return [(lo, hi, False)]
    runs: list[tuple[int, int, bool]] = []
    data_from = zero_from = lo
    for page in range(lo, hi + 1):
        if page < hi and ram.is_zero(page * PAGE_SIZE, PAGE_SIZE):
            continue
        if page - zero_from >= ZERO_RUN_MIN:
            if zero_from > data_from:
                runs.append((data_from, zero_from, True))
            runs.append((zero_from, page, False))
            data_from = page
        zero_from = page + 1
    if data_from < hi:
        runs.append((data_from, hi, True))
    return runs


def _bits_to_bytes(bitmap: bytes, count: int) -> bytes:
    """One byte per page (0 or 1) from an LSB-first bitmap."""
    return b"".join(_BIT_TABLE[b] for b in bitmap)[:count]


_BIT_TABLE = [bytes((b >> i) & 1 for i in range(8)) for b in range(256)]
