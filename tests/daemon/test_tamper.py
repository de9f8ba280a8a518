"""An on-path attacker between the daemons: a relay that flips, injects,
replays, drops and reorders frames of the push channel (one way per
connection). The pull refuses every tampered connection, saying why, fills
nothing it did not verify, and the migration completes over the next honest
connection."""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.harness.net import free_port
from tests.harness.waiting import wait_until
from umemd.protocol import HEADER, MAC_SIZE, PAGE_SIZE, Channel, FrameType

from .conftest import SOURCE_SIZE, Migration
from .test_pull import finish


class Tamper(enum.Enum):
    FLIP = "flip a bit of a page"
    INJECT = "inject a forged page"
    REPLAY = "replay a page frame"
    DROP = "drop a page frame"
    REORDER = "swap two page frames"


FRAME_MAC_REFUSAL = "frame MAC"  # what the pull's log says of each tampered connection


def read_frame(sock: socket.socket, authenticated: bool) -> bytes | None:
    """One whole frame (with its MAC once both AUTHs are past), or None at end of file."""
    header = _read(sock, HEADER.size)
    if header is None:
        return None
    _, _, _, length = HEADER.unpack(header)
    rest = _read(sock, length + (MAC_SIZE if authenticated else 0))
    return None if rest is None else header + rest


def _read(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class TamperingRelay:
    """Relays the serve's connections to the pull; the first push connections are tampered with,
    one way each, on the first two page frames after the source's RELEASED."""

    def __init__(self, upstream: int, plan: list[Tamper]) -> None:
        self.port = free_port()
        self.upstream = upstream
        self.plan = list(plan)
        self.done: list[Tamper] = []
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self._listener.accept()
                server = socket.create_connection(("127.0.0.1", self.upstream))
                threading.Thread(target=self._relay_back, args=(server, client), daemon=True).start()
                threading.Thread(target=self._relay_forward, args=(client, server), daemon=True).start()

    @staticmethod
    def _relay_back(server: socket.socket, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := server.recv(1 << 16):
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def _relay_forward(self, client: socket.socket, server: socket.socket) -> None:
        """Source to destination, frame by frame."""
        with contextlib.suppress(OSError):
            hello = read_frame(client, authenticated=False)
            if hello is None:
                return
            server.sendall(hello)  # the pull says HELLO only after the source's
            auth = read_frame(client, authenticated=False)
            if auth is None:
                return
            server.sendall(auth)
            push = hello[HEADER.size + 11] == Channel.PUSH  # the channel byte of the HELLO payload
            tamper = self.plan.pop(0) if push and self.plan else None
            released, held = False, b""
            while tamper is not None and (data := read_frame(client, authenticated=True)) is not None:
                kind = data[0]
                if not released or kind != FrameType.PAGES:
                    released = released or kind == FrameType.RELEASED
                    server.sendall(data)
                    continue
                server.sendall(self._tampered(tamper, data, held))
                if tamper is Tamper.REORDER and not held:
                    held = data  # sent after the next page frame
                    continue
                self.done.append(tamper)
                tamper = None
            while data := client.recv(1 << 20):  # the rest as it comes
                server.sendall(data)
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    @staticmethod
    def _tampered(tamper: Tamper, data: bytes, held: bytes) -> bytes:
        if tamper is Tamper.FLIP:
            flipped = bytearray(data)
            flipped[-MAC_SIZE - 1] ^= 0x01
            return bytes(flipped)
        if tamper is Tamper.INJECT:
            offset = data[HEADER.size:HEADER.size + 8]
            forged = HEADER.pack(FrameType.PAGES, 0, 0, 16 + PAGE_SIZE) + offset + (1).to_bytes(4, "big") + bytes(4)
            return forged + b"\xa5" * PAGE_SIZE + os.urandom(MAC_SIZE) + data
        if tamper is Tamper.REPLAY:
            return data + data
        if tamper is Tamper.DROP:
            return b""
        return data + held if held else b""  # REORDER: the second page frame first, then the first

    def close(self) -> None:
        self._listener.close()


@pytest.fixture
def relay(migration: Migration) -> Iterator[TamperingRelay]:
    r = TamperingRelay(migration.port, list(Tamper))
    yield r
    r.close()


def test_a_tampering_relay_gets_every_frame_refused_and_no_page_filled(migration: Migration,
                                                                       relay: TamperingRelay) -> None:
    pull = migration.pull()
    guest = migration.guest("random", threads=2, touches=50)  # maps the node now, checks every byte at the end
    migration.serve(connect=f"127.0.0.1:{relay.port}")
    wait_until(lambda: len(relay.done) == len(Tamper) or pull.proc.poll() is not None, 300,
               "every tampering to have been tried")
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE  # every byte equals the source's
    refusals = pull.text().count(FRAME_MAC_REFUSAL)
    assert refusals >= len(Tamper), f"the pull refused {refusals} of {len(Tamper)} tampered connections:\n" + \
        pull.text()[-3000:]
