"""Links over real sockets: the handshake and what arrives right behind it."""

from __future__ import annotations

import socket
import threading

from umemd.protocol import PAGE_SIZE, Authenticated, Channel, Connection, Info, Role
from umemd.transport import Deadline, Endpoint, _handshake

KEY = bytes(range(32))
MIGRATION = bytes(16)
RAM = 16 * PAGE_SIZE


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        data += sock.recv(n - len(data))
    return data


def scripted_source(sock: socket.socket) -> None:
    """A source that sends its AUTH and INFO in one segment."""
    conn = Connection(Role.SOURCE, Channel.PUSH, KEY, MIGRATION)
    sock.sendall(conn.data_to_send())  # HELLO
    conn.receive_data(recv_exact(sock, 96))  # the destination's HELLO and AUTH
    assert [conn.next_event(), conn.next_event()] == [Authenticated(Role.DESTINATION, Channel.PUSH), None]
    sock.sendall(conn.data_to_send() + conn.send_info(RAM))


def test_an_event_that_arrives_with_the_handshake_is_not_lost() -> None:
    ours, theirs = socket.socketpair()
    peer = threading.Thread(target=scripted_source, args=(theirs,))
    peer.start()
    link = _handshake(ours, Role.DESTINATION, KEY, MIGRATION, "test", Channel.PUSH, Deadline(10), 10)
    ours.settimeout(5)
    assert link.receive() == [Info(RAM)]
    peer.join()


def test_endpoint_parsing() -> None:
    assert Endpoint.parse("10.0.0.1:4444") == Endpoint("10.0.0.1", 4444)
    assert Endpoint.parse("[::1]:80") == Endpoint("::1", 80)
    assert Endpoint.parse(":4444") == Endpoint("127.0.0.1", 4444)
