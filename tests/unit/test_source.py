"""The page server's choice of what travels as data and what as a zero hint."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path
from typing import cast

from umemd.errors import ConnectError, MigrationAbortedError
from umemd.protocol import PAGE_SIZE, Channel, Connection, Info, Released, Role
from umemd.ramfile import RamFile
from umemd.session import SourceEvent, SourceGate, SourcePhase
from umemd.source import ZERO_RUN_MIN, PageServer, zero_split
from umemd.transport import Dialer, Link

KEY = bytes(range(32))
MIGRATION = bytes(16)


def test_zero_stretches_inside_data_travel_as_hints(tmp_path: Path) -> None:
    layout = "D" + "0" * ZERO_RUN_MIN + "DD" + "0" * (ZERO_RUN_MIN - 1) + "D" + "0" * ZERO_RUN_MIN
    path = tmp_path / "ram"
    path.write_bytes(b"".join((b"\x01" if c == "D" else b"\x00") * PAGE_SIZE for c in layout))
    ram = RamFile(path)
    n = len(layout)
    short = 1 + ZERO_RUN_MIN + 2
    assert zero_split(ram, 0, n) == [(0, 1, True), (1, 1 + ZERO_RUN_MIN, False),
                                     (1 + ZERO_RUN_MIN, short + ZERO_RUN_MIN, True),  # the short stretch rides
                                     (short + ZERO_RUN_MIN, n, False)]
    assert zero_split(ram, 1, 1 + ZERO_RUN_MIN) == [(1, 1 + ZERO_RUN_MIN, False)]
    ram.close()


def test_a_hole_written_before_the_release_is_sent_as_data(tmp_path: Path) -> None:
    """The still-running guest may write into a hole of its RAM file after serve starts and before
    it stops: the extents must be read after the release, never at start-up."""
    path = tmp_path / "ram"
    with open(path, "wb") as f:
        f.write(b"\x01" * PAGE_SIZE)
        f.truncate(64 * PAGE_SIZE)  # pages 1..63: a hole
    ram = RamFile(path)
    gate = SourceGate()
    server = PageServer(ram, cast(Dialer, None), gate)
    with open(path, "r+b") as f:  # the guest, before it stops
        f.seek(40 * PAGE_SIZE)
        f.write(b"\x02" * PAGE_SIZE)
    gate.handle(SourceEvent.PRE_SWITCHOVER)
    assert (40, 41, True) in server._runs(40, 41), "a page written before the release travels as a ZERO hint"
    ram.close()


def test_the_last_have_of_the_cover_is_applied_and_a_complete_behind_it_ends_the_push(tmp_path: Path) -> None:
    """A destination that has every page says so in its HAVE and sends COMPLETE in the same segment:
    the source must take that HAVE (the codec ends the cover while parsing it) and stop at once."""
    path = tmp_path / "ram"
    path.write_bytes(b"\x01" * 16 * PAGE_SIZE)
    ram = RamFile(path)
    gate = SourceGate()
    gate.handle(SourceEvent.OPERATOR_STOPPED)
    server = PageServer(ram, cast(Dialer, None), gate)
    ours, theirs = socket.socketpair()
    src, dst = handshaken_push()
    feed(dst, src.send_info(ram.size))
    theirs.sendall(dst.send_have(0, b"\xff\xff", 16) + dst.send_complete())
    server._serve_push(Link(ours, src, "test"))
    assert server.complete.is_set()
    assert server.stats.pushed_pages == 0, "the destination had every page"
    ours.close()
    theirs.close()
    ram.close()


class OneLinkDialer:
    """Hands out one handshaken push link, then refuses (no demand link at all)."""

    def __init__(self, link: Link) -> None:
        self._link: Link | None = link

    def link(self, channel: Channel) -> Link:
        if channel is Channel.PUSH and self._link is not None:
            link, self._link = self._link, None
            return link
        raise ConnectError("no more links in this test")


def test_an_abort_racing_the_destinations_complete_ends_serve_with_the_abort(tmp_path: Path) -> None:
    """The source guest resumes (the gate aborts) while the destination's COMPLETE arrives on the
    push channel, before the abort's callback has run: serve must end with the abort, never with
    "the destination has every page" (seen in CI: serve exit 0 after "migration aborted")."""
    path = tmp_path / "ram"
    path.write_bytes(b"\x01" * 16 * PAGE_SIZE)
    ram = RamFile(path)
    ours, theirs = socket.socketpair()
    src, dst = handshaken_push()

    def abort_after_the_complete_is_handled(phase: SourcePhase, reason: str) -> None:
        theirs.sendall(dst.send_complete())
        with contextlib.suppress(ConnectionResetError):  # the source closes the push link once it has
            while theirs.recv(1 << 16):  # handled COMPLETE
                pass
        server.on_phase(phase, reason)

    gate = SourceGate(lambda phase, reason: abort_after_the_complete_is_handled(phase, reason)
                      if phase is SourcePhase.ABORTED else server.on_phase(phase, reason))
    server = PageServer(ram, cast(Dialer, OneLinkDialer(Link(ours, src, "test"))), gate, push_rate=1.0)
    outcome: list[BaseException | int] = []

    def run() -> None:
        try:
            outcome.append(server.run())
        except BaseException as e:  # the outcome is the test's
            outcome.append(e)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    while not any(isinstance(e, Info) for e in received(dst, theirs)):
        pass
    theirs.sendall(dst.send_have(0, b"\x00\x00", 16))
    gate.handle(SourceEvent.PRE_SWITCHOVER)
    while not any(isinstance(e, Released) for e in received(dst, theirs)):
        pass
    gate.handle(SourceEvent.RESUMED)
    runner.join()
    assert isinstance(outcome[0], MigrationAbortedError), f"serve ended with {outcome[0]!r}, not the abort"
    assert not server.complete.is_set(), "an aborted server says the destination has every page"
    ours.close()
    theirs.close()
    ram.close()


def received(conn: Connection, sock: socket.socket) -> list[object]:
    conn.receive_data(sock.recv(1 << 16))
    events = []
    while (event := conn.next_event()) is not None:
        events.append(event)
    return events


def handshaken_push() -> tuple[Connection, Connection]:
    """A source and a destination codec of one push channel, past both AUTHs."""
    src = Connection(Role.SOURCE, Channel.PUSH, KEY, MIGRATION)
    dst = Connection(Role.DESTINATION, Channel.PUSH, KEY, MIGRATION)
    feed(dst, src.data_to_send())
    feed(src, dst.data_to_send())
    feed(dst, src.data_to_send())
    return src, dst


def feed(conn: Connection, data: bytes) -> None:
    conn.receive_data(data)
    while conn.next_event() is not None:
        pass
