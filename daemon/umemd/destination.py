"""The destination daemon (``umemd pull``).

Holds the server fd of one umem instance and makes every page present:

- the demand thread reads fault records from the server fd, asks the
  source for those pages on the demand channel and fills what comes back;
- the push thread tells the source which pages are present (HAVE), then
  fills the background stream, one UMEM_FILL or UMEM_ZERO per frame.

Either link may drop: the thread gets a new one (reconnecting with backoff,
or waiting for the source to connect again), and asks again for every fault
not served yet. When every page is present it sends COMPLETE, destroys the
instance's node (the memory stays with QEMU's mapping) and returns. Pages
are taken only after the source said RELEASED on that link (the codec
refuses them before). An ERROR ABORTED from the source ends the pull with
MigrationAbortedError: the instance is left for the operator to destroy,
never completed.

Threads: ``umemd-demand`` and ``umemd-push`` (each owns its link), the main
thread (checks for the last page), the status and progress threads (read
only). ``_lock`` guards ``_inflight`` and the counters both channel threads
add to (``stats``: pages, zero hints, skipped, bytes).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import selectors
import threading
import time
from collections.abc import Callable
from pathlib import Path

from umemd.device import Control, NodeOwner, Server
from umemd.errors import (
    ConnectError,
    DeviceError,
    InstanceExistsError,
    MigrationAbortedError,
    MigrationMismatchError,
    ProtocolError,
    SizeMismatchError,
    SourceLostError,
    UmemError,
)
from umemd.priority import favour_this_thread
from umemd.protocol import (
    MAX_HAVE_PAGES,
    MAX_REQUEST_PAGES,
    PAGE_SIZE,
    Channel,
    Closed,
    Done,
    ErrorCode,
    Info,
    PeerError,
    Released,
    Zero,
)
from umemd.protocol import Pages as PagesEvent
from umemd.stats import PullStats
from umemd.status import PullState
from umemd.transport import Dialer, Link

log = logging.getLogger(__name__)

CHECK_INTERVAL = 0.25  # seconds between completion checks while idle


class Puller:
    """Pulls every page of one instance from its source."""

    def __init__(self, control: Control, server: Server, dialer: Dialer, stats: PullStats, *,
                 source_timeout: float | None = None) -> None:
        self.control = control
        self.server = server
        self.dialer = dialer
        self.stats = stats
        self.source_timeout = source_timeout  # None: wait for a page server for ever
        self.source_lost_since: float | None = None  # wall clock of the last link's loss, while none is up
        self._links_up = 0
        self._no_source_since = time.monotonic()  # while no link is up (from the start on)
        self.done = threading.Event()
        self.failed: BaseException | None = None
        self._inflight: dict[int, float] = {}  # page offset -> when its fault was read
        self._lock = threading.Lock()
        self._push_done = threading.Event()  # the source said DONE on the push channel
        self.state = PullState.READY
        self.source_released = False  # a link said RELEASED: the source guest is stopped for good
        self.on_release: Callable[[], None] = lambda: None  # e.g. a status line at once

    def run(self) -> None:
        """Pull until every page is present, then destroy the node."""
        threads = [threading.Thread(target=self._guard, args=(loop,), name=name, daemon=True)
                   for loop, name in ((self._demand_loop, "umemd-demand"), (self._push_loop, "umemd-push"))]
        for t in threads:
            t.start()
        while not self.done.wait(CHECK_INTERVAL):
            self._check_complete()
            self._check_source()
        if self.failed:
            raise self.failed
        for t in threads:
            t.join(5)
        self.stats.finished = time.monotonic()
        self.control.destroy(self.server.name)
        log.info("every page of %r is present; its node is destroyed", self.server.name)

    def present(self) -> int:
        return self.server.stats().present

    def _check_source(self) -> None:
        with self._lock:
            silent = None if self._links_up else time.monotonic() - self._no_source_since
        if silent is not None and self.source_timeout is not None and silent > self.source_timeout:
            self.state = PullState.SOURCE_LOST
            self.failed = SourceLostError(
                f"no page server for {silent:.0f} s (--source-timeout {self.source_timeout:g}): "
                f"instance {self.server.name!r} stays, {self.present()} of {self.server.pages} pages present; "
                f"start umemd serve on the source again, then umemd pull again (it attaches)")
            self.done.set()

    def _link_up(self) -> None:
        with self._lock:
            self._links_up += 1
            self.source_lost_since = None

    def _link_down(self) -> None:
        with self._lock:
            self._links_up -= 1
            if not self._links_up:
                self._no_source_since = time.monotonic()
                self.source_lost_since = time.time()

    def _check_complete(self) -> bool:
        if self.present() == self.server.pages:
            self.done.set()
        return self.done.is_set()

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except BaseException as e:  # a bug or a fatal mismatch: stop everything
            self.failed = e
            self.done.set()

    def _link(self, channel: Channel) -> Link | None:
        """A new link whose INFO matched the instance, or None once done."""
        while not self.done.is_set():
            try:
                link = self.dialer.link(channel)
            except ConnectError:
                return None
            try:
                for event in link.events():
                    if isinstance(event, Info):
                        if event.ram_size != self.server.size:  # refused; the right source may come
                            link.send_frame(link.conn.error_frame, ErrorCode.SIZE_MISMATCH,
                                            f"RAM size differs: this instance has {self.server.size} bytes")
                            log.error("%s channel: the source serves %d bytes but instance %r has %d: point "
                                      "umemd serve at this guest's RAM file", channel.name.lower(),
                                      event.ram_size, self.server.name, self.server.size)
                            break
                        self.state = PullState.PULLING
                        self._link_up()
                        return link
                    if isinstance(event, PeerError):
                        self._check_abort(event)
                    break
            except DeviceError:  # the instance itself failed (destroyed, ENOMEM...): no link fixes that
                raise
            except (ProtocolError, OSError) as e:
                log.warning("%s channel: %s", channel.name.lower(), e)
            link.close()
        return None

    def _link_ended(self, link: Link) -> None:
        link.close()
        self._link_down()
        if not self.done.is_set():
            self.stats.reconnects += 1
            log.info("%s channel ended before every page was present: waiting for the source again",
                     link.channel.name.lower())

    # ---- demand ---------------------------------------------------------------

    def _demand_loop(self) -> None:
        favour_this_thread()
        while (link := self._link(Channel.DEMAND)) is not None:
            try:
                self._serve_faults(link)
            except DeviceError:  # the instance itself failed (destroyed, ENOMEM...): no link fixes that
                raise
            except (ProtocolError, OSError) as e:
                log.warning("demand channel lost: %s; reconnecting", e)
            finally:
                self._link_ended(link)

    def _serve_faults(self, link: Link) -> None:
        with self._lock:
            pending = sorted(self._inflight)
        if pending:  # asked of a server that went away: ask this one
            link.send_frame(link.conn.send_request, pending)
        with selectors.DefaultSelector() as selector:
            selector.register(self.server.fileno(), selectors.EVENT_READ, "faults")
            selector.register(link.sock, selectors.EVENT_READ, "link")
            while not self.done.is_set():
                ready = [] if link.buffered() else selector.select(CHECK_INTERVAL)
                if link.buffered() and not self._receive(link):
                    return
                for key, _ in ready:
                    if key.data == "faults":
                        self._request_faults(link)
                    elif not self._receive(link):
                        return
                link.check_alive()
                if not ready and not link.buffered():
                    self._request_stragglers(link)

    def _request_faults(self, link: Link) -> None:
        faults = self.server.read_faults()
        if self.server.destroyed:  # end of file: no page can be filled any more
            raise DeviceError(errno.ENODEV, f"instance {self.server.name!r} was destroyed under this pull "
                              "(umemd destroy?); tasks touching its missing pages get SIGBUS")
        now = time.monotonic()
        new = []
        with self._lock:
            for fault in faults:
                if fault.offset not in self._inflight:
                    self._inflight[fault.offset] = now
                    new.append(fault.offset)
        self.stats.faults += len(faults)
        if new:
            link.send_frame(link.conn.send_request, new)

    def _request_stragglers(self, link: Link) -> None:
        """After the push is done, ask on demand for pages still missing (pages
        the source sent on a demand link that dropped before they arrived),
        one REQUEST frame at a time so the link never clogs with requests."""
        if not self._push_done.is_set() or self._inflight:
            return
        first_missing = itertools.islice(self.server.missing_pages(), MAX_REQUEST_PAGES)
        missing = [page * PAGE_SIZE for page in first_missing]
        if missing:
            log.info("asking on demand for %d pages the push did not deliver", len(missing))
            now = time.monotonic()
            with self._lock:
                self._inflight.update(dict.fromkeys(missing, now))
            link.send_frame(link.conn.send_request, missing)

    def _receive(self, link: Link) -> bool:
        """Fill what arrived; False when the link closed."""
        before = link.bytes_in
        events = link.receive()
        with self._lock:
            self.stats.bytes_received += link.bytes_in - before
        for event in events:
            if isinstance(event, PagesEvent | Zero):
                self._fill(event, demand=link.channel is Channel.DEMAND)
            elif isinstance(event, Done):
                self._push_done.set()
                log.info("the source has pushed every page (%d as data, %d as zero hints)", event.pages, event.zeros)
            elif isinstance(event, Released):
                if not self.source_released:
                    log.info("the source guest is stopped for good: pages follow")
                    self.source_released = True
                    self.on_release()
            elif isinstance(event, PeerError):
                self._check_abort(event)
                log.error("%s channel: the source says: %s", link.channel.name.lower(), event.reason)
                return False
            elif isinstance(event, Closed):
                return False
        return True

    def _check_abort(self, event: PeerError) -> None:
        if event.code == ErrorCode.ABORTED:
            self.state = PullState.ABORTED
            raise MigrationAbortedError(
                f"{event.reason}. Instance {self.server.name!r} must not be used: the source guest may have run on; "
                f"remove it (umemd destroy {self.server.name}) and retry with a new --migration-id")

    def _fill(self, event: PagesEvent | Zero, *, demand: bool) -> None:
        if isinstance(event, PagesEvent):
            result = self.server.fill([(event.offset, event.data)])
        else:
            result = self.server.zero(event.offset, event.count * PAGE_SIZE)
        with self._lock:  # both channel threads count here
            if isinstance(event, Zero):
                self.stats.zero_pages += result.done
            if demand:
                self.stats.demand_pages += result.done
            else:
                self.stats.pushed_pages += result.done
            self.stats.skipped_pages += result.skipped
        self._served(event.offset, event.count)

    def _served(self, offset: int, count: int) -> None:
        now = time.monotonic()
        with self._lock:
            if not self._inflight:
                return
            for page_offset in range(offset, offset + count * PAGE_SIZE, PAGE_SIZE):
                asked = self._inflight.pop(page_offset, None)
                if asked is not None:
                    self.stats.latency.add(now - asked, asked)

    # ---- push -----------------------------------------------------------------

    def _push_loop(self) -> None:
        while (link := self._link(Channel.PUSH)) is not None:
            try:
                self._send_have(link)
                if self._pull_stream(link):
                    return
            except DeviceError:  # the instance itself failed (destroyed, ENOMEM...): no link fixes that
                raise
            except (ProtocolError, OSError) as e:
                log.warning("push channel lost: %s; reconnecting", e)
            finally:
                self._link_ended(link)

    def _pull_stream(self, link: Link) -> bool:
        """Fill the push stream; True once every page is present (COMPLETE sent)."""
        next_check = 0.0  # the present count costs an ioctl: not after every chunk while data streams
        with selectors.DefaultSelector() as selector:
            selector.register(link.sock, selectors.EVENT_READ)
            while True:
                now = time.monotonic()
                if self._push_done.is_set() or now >= next_check:
                    if self._check_complete():
                        link.send_frame(link.conn.send_complete)
                        return True
                    next_check = now + CHECK_INTERVAL
                if (link.buffered() or selector.select(CHECK_INTERVAL)) and not self._receive(link):
                    return False
                link.check_alive()

    def _send_have(self, link: Link) -> None:
        """HAVE frames covering every page, from the instance's present bitmap."""
        bitmap = self.server.present_bitmap()
        for first in range(0, self.server.pages, MAX_HAVE_PAGES):
            count = min(MAX_HAVE_PAGES, self.server.pages - first)
            link.send_frame(link.conn.send_have, first, bitmap[first // 8:first // 8 + (count + 7) // 8], count)
        log.info("push channel: told the source which %d pages are present", self.present())


def open_instance(control: Control, name: str, size: int, migration_id: bytes, owner: NodeOwner | None = None,
                  cgroup: Path | None = None) -> tuple[Server, bool]:
    """Create instance ``name`` of ``size`` bytes for ``migration_id`` (its
    kernel tag), or attach to it after a restart of the same migration.

    A new instance's node belongs to ``owner`` (default root:root 0600) and
    its pages are charged to ``cgroup`` (default: the first mapper's).
    Returns the server and whether it was attached.
    """
    try:
        return control.create(name, size, nonblock=True, owner=owner, cgroup=cgroup, tag=migration_id), False
    except InstanceExistsError:
        server = control.attach(name, nonblock=True)
    if server.tag != migration_id:
        server.close()
        raise MigrationMismatchError(
            f"instance {name!r} belongs to migration {server.tag.hex()}, not to {migration_id.hex()}: it is left "
            f"from another migration; if no guest maps it, remove it (umemd destroy {name}) and start again")
    if server.size != size:
        server.close()
        raise SizeMismatchError(f"instance {name!r} exists with {server.size} bytes, not {size}: "
                                f"destroy it (umemd destroy {name}) or pass its size")
    with contextlib.suppress(UmemError):
        log.info("attached to existing instance %r: %d of %d pages present", name, server.stats().present,
                 server.pages)
    return server, True
