"""The sans-I/O wire codec: handshake, frames, state machine, bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umemd.errors import LocalProtocolError, RemoteProtocolError
from umemd.protocol import (
    HEADER,
    MAX_RUN_PAGES,
    PAGE_SIZE,
    Authenticated,
    Channel,
    Closed,
    Connection,
    Done,
    ErrorCode,
    Event,
    FrameType,
    Have,
    Info,
    Pages,
    PeerError,
    Request,
    Role,
    State,
    Zero,
    frame,
)

KEY = bytes(range(32))
RAM = 64 * PAGE_SIZE


def events(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def connected(channel: Channel = Channel.DEMAND) -> tuple[Connection, Connection]:
    """A source and a destination past the handshake."""
    src, dst = Connection(Role.SOURCE, channel, KEY), Connection(Role.DESTINATION, channel, KEY)
    hello_s, hello_d = src.data_to_send(), dst.data_to_send()
    assert events(src, hello_d) == [] and events(dst, hello_s) == []
    assert events(src, dst.data_to_send()) == [Authenticated(Role.DESTINATION, channel)]
    assert events(dst, src.data_to_send()) == [Authenticated(Role.SOURCE, channel)]
    assert src.state is State.READY and dst.state is State.READY
    return src, dst


def test_handshake_authenticates_both_sides() -> None:
    connected(Channel.DEMAND)
    connected(Channel.PUSH)


def test_a_wrong_key_gets_an_error_and_no_data() -> None:
    src, dst = Connection(Role.SOURCE, Channel.DEMAND, KEY), Connection(Role.DESTINATION, Channel.DEMAND, b"x" * 32)
    hello_s, hello_d = src.data_to_send(), dst.data_to_send()
    events(src, hello_d)
    events(dst, hello_s)
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(src, dst.data_to_send())
    assert src.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        src.send_info(RAM)
    reply = src.data_to_send()  # our AUTH, then an ERROR frame saying why
    assert reply.endswith(frame(FrameType.ERROR, struct.pack("!HH", ErrorCode.AUTH, 0) + b"authentication failed"))
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(dst, reply)  # the destination does not accept our tag either


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (struct.pack("!8sHBBI16s", b"NOTUMEM!", 1, 2, 1, 0, bytes(16)), "bad magic"),
        (struct.pack("!8sHBBI16s", b"UMEMWIRE", 2, 2, 1, 0, bytes(16)), "version 2"),
        (struct.pack("!8sHBBI16s", b"UMEMWIRE", 1, 1, 1, 0, bytes(16)), "expected a destination"),
        (struct.pack("!8sHBBI16s", b"UMEMWIRE", 1, 2, 2, 0, bytes(16)), "on the demand channel"),
    ],
    ids=["magic", "version", "role", "channel"],
)
def test_bad_hello(hello: bytes, message: str) -> None:
    src = Connection(Role.SOURCE, Channel.DEMAND, KEY)
    with pytest.raises(RemoteProtocolError, match=message):
        events(src, frame(FrameType.HELLO, hello))
    assert src.state is State.ERROR


def test_short_key_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        Connection(Role.SOURCE, Channel.DEMAND, b"short")


def test_demand_round_trip() -> None:
    src, dst = connected(Channel.DEMAND)
    assert events(dst, src.send_info(RAM)) == [Info(RAM, PAGE_SIZE)]
    assert events(src, dst.send_request([0, 5 * PAGE_SIZE])) == [Request((0, 5 * PAGE_SIZE))]
    data = bytes(range(256)) * 16 * 2
    got = events(dst, src.send_pages_header(5 * PAGE_SIZE, 2) + data + src.send_zero(0, 1))
    assert isinstance(got[0], Pages) and got[0].offset == 5 * PAGE_SIZE and bytes(got[0].data) == data
    assert got[0].count == 2 and got[1] == Zero(0, 1)


def test_requests_are_split_into_bounded_frames() -> None:
    src, dst = connected(Channel.DEMAND)
    offsets = [i * PAGE_SIZE for i in range(600)]
    got = events(src, dst.send_request(offsets))
    assert [len(e.offsets) for e in got if isinstance(e, Request)] == [256, 256, 88]


def test_push_round_trip() -> None:
    src, dst = connected(Channel.PUSH)
    events(dst, src.send_info(RAM))
    assert events(src, dst.send_have(8, b"\x05\x01", 10)) == [Have(8, 10, b"\x05\x01")]
    assert Have(8, 10, b"\x05\x01").present() == [8, 10, 16]
    assert events(dst, src.send_done(60, 4)) == [Done(60, 4)]
    assert events(dst, b"") == [Closed()] and dst.state is State.CLOSED


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda s, d: HEADER.pack(FrameType.PAGES, 0, 0, 16 + PAGE_SIZE * (MAX_RUN_PAGES + 1)), "exceeds its limit"),
        (lambda s, d: HEADER.pack(42, 0, 0, 0), "unknown frame type"),
        (lambda s, d: HEADER.pack(FrameType.ZERO, 1, 0, 16) + bytes(16), "nonzero flags"),
        (lambda s, d: frame(FrameType.REQUEST, struct.pack("!IIQ", 1, 0, 0)), "REQUEST is not allowed"),
        (lambda s, d: frame(FrameType.HELLO, bytes(32)), "HELLO is not allowed"),
        (lambda s, d: s.send_zero(RAM, 1), "beyond the RAM size"),
        (lambda s, d: s.send_zero(1, 1), "unaligned"),
        (lambda s, d: HEADER.pack(FrameType.PAGES, 0, 0, 16 + PAGE_SIZE) + struct.pack("!QII", 0, 2, 0)
         + bytes(PAGE_SIZE), "PAGES run of 2 pages"),
        (lambda s, d: frame(FrameType.DONE, bytes(8)), "expected 16"),
    ],
    ids=["oversized", "unknown-type", "flags", "wrong-direction", "second-hello", "out-of-range", "unaligned",
         "short-run", "short-done"],
)
def test_malformed_frames_put_the_connection_in_error(build, message: str) -> None:  # type: ignore[no-untyped-def]
    src, dst = connected(Channel.PUSH)
    events(dst, src.send_info(RAM))
    with pytest.raises(RemoteProtocolError, match=message):
        events(dst, build(src, dst))
    assert dst.state is State.ERROR
    assert dst.next_event() is None


def test_pages_before_authentication_are_refused() -> None:
    dst = Connection(Role.DESTINATION, Channel.DEMAND, KEY)
    with pytest.raises(RemoteProtocolError, match="PAGES is not allowed"):
        events(dst, HEADER.pack(FrameType.PAGES, 0, 0, 16 + PAGE_SIZE) + struct.pack("!QII", 0, 1, 0)
               + bytes(PAGE_SIZE))


def test_truncated_connection() -> None:
    src, dst = connected()
    with pytest.raises(RemoteProtocolError, match="middle of a frame"):
        events(dst, src.send_info(RAM)[:10] + b"")
        events(dst, b"")


def test_sending_out_of_turn_is_our_bug() -> None:
    src, dst = connected(Channel.DEMAND)
    with pytest.raises(LocalProtocolError):
        dst.send_info(RAM)
    with pytest.raises(LocalProtocolError):
        src.send_done(1, 1)  # DONE belongs to the push channel
    with pytest.raises(LocalProtocolError):
        src.send_pages_header(0, MAX_RUN_PAGES + 1)


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=4096))
def test_random_bytes_only_ever_raise_remote_protocol_errors(data: bytes) -> None:
    for role in Role:
        conn = Connection(role, Channel.PUSH, KEY)
        try:
            events(conn, data)
            events(conn, b"")
        except RemoteProtocolError:
            assert conn.state is State.ERROR


@settings(deadline=None, max_examples=100)
@given(st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=20))
def test_any_split_of_a_stream_gives_the_same_events(cuts: list[int]) -> None:
    src, dst = connected(Channel.PUSH)
    stream = (src.send_info(RAM) + src.send_pages_header(PAGE_SIZE, 3) + bytes([7]) * 3 * PAGE_SIZE
              + src.send_zero(0, 1) + src.send_done(3, 1))
    got: list[object] = []
    position = 0
    for cut in cuts:
        chunk = stream[position:position + cut]
        if not chunk:
            break  # b"" would mean end of file
        position += len(chunk)
        got += [(type(e).__name__, bytes(e.data) if isinstance(e, Pages) else e) for e in events(dst, chunk)]
    if position < len(stream):
        got += [(type(e).__name__, bytes(e.data) if isinstance(e, Pages) else e)
                for e in events(dst, stream[position:])]
    assert [name for name, _ in got] == ["Info", "Pages", "Zero", "Done"]
    assert got[1][1] == bytes([7]) * 3 * PAGE_SIZE


@settings(deadline=None, max_examples=200)
@given(st.integers(min_value=0, max_value=len(frame(FrameType.ZERO, bytes(16))) - 1), st.integers(0, 255))
def test_any_corrupted_byte_is_caught_or_harmless(position: int, value: int) -> None:
    src, dst = connected(Channel.PUSH)
    events(dst, src.send_info(RAM))
    data = bytearray(src.send_zero(PAGE_SIZE, 2))
    data[position] = value
    try:
        got = events(dst, bytes(data))
    except RemoteProtocolError:
        assert dst.state is State.ERROR
    else:
        # No checksum in the frame (TCP's and TLS's cover that): a byte can turn
        # it into another valid frame, but never into one the codec should refuse.
        # ERROR is valid in every state (docs/protocol.md) and ends the connection.
        for e in got:
            assert isinstance(e, Zero | Done | PeerError)
            if isinstance(e, Zero):
                assert e.offset + e.count * PAGE_SIZE <= RAM
            if isinstance(e, PeerError):
                assert dst.state is State.CLOSED

