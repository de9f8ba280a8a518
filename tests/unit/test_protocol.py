"""The sans-I/O wire codec: handshake, frames, state machine, bad input."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from umemd.errors import LocalProtocolError, MigrationMismatchError, RemoteProtocolError
from umemd.protocol import (
    HEADER,
    MAC_SIZE,
    MAX_FRAME,
    MAX_RUN_PAGES,
    PAGE_SIZE,
    PREAUTH_BUFFER,
    VERSION,
    Authenticated,
    Channel,
    Closed,
    Complete,
    Connection,
    Done,
    ErrorCode,
    Event,
    FrameType,
    Have,
    Info,
    Pages,
    PeerError,
    PushPhase,
    Released,
    Request,
    Role,
    State,
    Zero,
    frame,
)

KEY = bytes(range(32))
MIGRATION = bytes.fromhex("5f0c" * 8)
OTHER_MIGRATION = bytes.fromhex("a11e" * 8)
RAM = 64 * PAGE_SIZE


def events(conn: Connection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def connected(channel: Channel = Channel.DEMAND, *, release: bool = True) -> tuple[Connection, Connection]:
    """A source and a destination past the handshake (and, with ``release``, the source's RELEASED)."""
    src, dst = Connection(Role.SOURCE, channel, KEY, MIGRATION), Connection(Role.DESTINATION, channel, KEY,
                                                                             MIGRATION)
    hello_s, hello_d = src.data_to_send(), dst.data_to_send()
    assert events(src, hello_d) == [] and events(dst, hello_s) == []
    assert events(src, dst.data_to_send()) == [Authenticated(Role.DESTINATION, channel)]
    assert events(dst, src.data_to_send()) == [Authenticated(Role.SOURCE, channel)]
    assert src.state is State.READY and dst.state is State.READY
    if release:
        assert events(dst, src.send_released()) == [Released()]
        assert src.state is State.RELEASED and dst.state is State.RELEASED
    return src, dst


PAGES = RAM // PAGE_SIZE


def pushing() -> tuple[Connection, Connection]:
    """A push channel past INFO and a HAVE that covers every page (none present)."""
    src, dst = connected(Channel.PUSH)
    assert events(dst, src.send_info(RAM)) == [Info(RAM, PAGE_SIZE)]
    assert events(src, dst.send_have(0, bytes(PAGES // 8), PAGES)) == [Have(0, PAGES, bytes(PAGES // 8))]
    assert src.push_phase is PushPhase.PUSHING and dst.push_phase is PushPhase.PUSHING
    return src, dst


def test_handshake_authenticates_both_sides() -> None:
    connected(Channel.DEMAND)
    connected(Channel.PUSH)


def test_a_wrong_key_gets_an_error_and_no_data() -> None:
    src = Connection(Role.SOURCE, Channel.DEMAND, KEY, MIGRATION)
    dst = Connection(Role.DESTINATION, Channel.DEMAND, b"x" * 32, MIGRATION)
    hello_s, hello_d = src.data_to_send(), dst.data_to_send()
    events(src, hello_d)
    events(dst, hello_s)
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(src, dst.data_to_send())
    assert src.state is State.ERROR
    with pytest.raises(LocalProtocolError):
        src.send_info(RAM)
    reply = src.data_to_send()  # our AUTH, then an ERROR frame saying why
    assert frame(FrameType.ERROR, struct.pack("!HH", ErrorCode.AUTH, 0) + b"authentication failed") in reply
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(dst, reply)  # the destination does not accept our tag either


@pytest.mark.parametrize(
    ("hello", "message"),
    [
        (struct.pack("!8sHBBI16s16s", b"NOTUMEM!", VERSION, 2, 1, 0, bytes(16), MIGRATION), "bad magic"),
        (struct.pack("!8sHBBI16s16s", b"UMEMWIRE", VERSION + 1, 2, 1, 0, bytes(16), MIGRATION),
         f"version {VERSION + 1}"),
        (struct.pack("!8sHBBI16s16s", b"UMEMWIRE", VERSION, 1, 1, 0, bytes(16), MIGRATION),
         "expected a destination"),
        (struct.pack("!8sHBBI16s16s", b"UMEMWIRE", VERSION, 2, 2, 0, bytes(16), MIGRATION),
         "on the demand channel"),
        (struct.pack("!8sHBBI16s", b"UMEMWIRE", VERSION, 2, 1, 0, bytes(16)), "HELLO payload of 32 bytes"),
    ],
    ids=["magic", "version", "role", "channel", "short"],
)
def test_bad_hello(hello: bytes, message: str) -> None:
    src = Connection(Role.SOURCE, Channel.DEMAND, KEY, MIGRATION)
    with pytest.raises(RemoteProtocolError, match=message):
        events(src, frame(FrameType.HELLO, hello))
    assert src.state is State.ERROR


def test_a_peer_of_protocol_version_1_is_refused_naming_both_versions() -> None:
    src = Connection(Role.SOURCE, Channel.DEMAND, KEY, MIGRATION)
    src.data_to_send()
    v1_hello = struct.pack("!8sHBBI16s", b"UMEMWIRE", 1, Role.DESTINATION, Channel.DEMAND, 0, bytes(16))
    with pytest.raises(RemoteProtocolError,
                       match=f"the peer speaks umem protocol version 1, this umemd speaks {VERSION}"):
        events(src, frame(FrameType.HELLO, v1_hello))
    code, _ = struct.unpack_from("!HH", src.data_to_send(), HEADER.size)
    assert code == ErrorCode.VERSION  # the peer is told why


def test_daemons_of_two_migrations_refuse_each_other_naming_both_ids() -> None:
    src = Connection(Role.SOURCE, Channel.PUSH, KEY, OTHER_MIGRATION)  # a stale serve, with the right key
    dst = Connection(Role.DESTINATION, Channel.PUSH, KEY, MIGRATION)
    hello_s, hello_d = src.data_to_send(), dst.data_to_send()
    for conn, hello in ((dst, hello_s), (src, hello_d)):
        with pytest.raises(MigrationMismatchError) as info:
            events(conn, hello)
        assert MIGRATION.hex() in str(info.value) and OTHER_MIGRATION.hex() in str(info.value)
        assert conn.state is State.ERROR
        reply = conn.data_to_send()
        assert b"AUTH" not in reply and HEADER.unpack_from(reply)[0] == FrameType.ERROR  # no AUTH, only why
        assert struct.unpack_from("!HH", reply, HEADER.size)[0] == ErrorCode.MIGRATION


def test_the_migration_id_is_bound_into_auth() -> None:
    """A relay that rewrites the id in a HELLO cannot make the AUTH of another migration pass."""
    src = Connection(Role.SOURCE, Channel.DEMAND, KEY, OTHER_MIGRATION)
    dst = Connection(Role.DESTINATION, Channel.DEMAND, KEY, MIGRATION)
    hello_s = bytearray(src.data_to_send())
    hello_s[-16:] = MIGRATION  # rewritten by the relay
    events(dst, bytes(hello_s))
    rewritten_d = bytearray(dst.data_to_send())  # its HELLO and its AUTH
    rewritten_d[HEADER.size + 32:HEADER.size + 48] = OTHER_MIGRATION
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(src, bytes(rewritten_d))


def test_short_key_is_refused() -> None:
    with pytest.raises(LocalProtocolError, match="32 bytes"):
        Connection(Role.SOURCE, Channel.DEMAND, b"short", MIGRATION)


def test_demand_round_trip() -> None:
    src, dst = connected(Channel.DEMAND)
    assert events(dst, src.send_info(RAM)) == [Info(RAM, PAGE_SIZE)]
    assert events(src, dst.send_request([0, 5 * PAGE_SIZE])) == [Request((0, 5 * PAGE_SIZE))]
    data = bytes(range(256)) * 16 * 2
    got = events(dst, b"".join(src.send_pages(5 * PAGE_SIZE, memoryview(data))) + src.send_zero(0, 1))
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
    bitmap = b"\x05\x01" + bytes(6)
    assert events(src, dst.send_have(0, bitmap[:4], 32)) == [Have(0, 32, bitmap[:4])]
    assert src.push_phase is PushPhase.COVER, "half the pages covered"
    assert events(src, dst.send_have(32, bitmap[4:], 32)) == [Have(32, 32, bitmap[4:])]
    assert Have(0, 64, bitmap).present() == [0, 2, 8]
    assert src.push_phase is PushPhase.PUSHING
    assert events(dst, src.send_done(60, 4)) == [Done(60, 4)]
    assert src.push_phase is PushPhase.DONE and dst.push_phase is PushPhase.DONE
    assert events(src, dst.send_complete()) == [Complete()]
    assert src.push_phase is PushPhase.COMPLETE
    assert events(dst, b"") == [Closed()] and dst.state is State.CLOSED


def test_the_cover_goes_in_order_from_page_0() -> None:
    src, dst = connected(Channel.PUSH)
    events(dst, src.send_info(RAM))
    with pytest.raises(LocalProtocolError, match="HAVE from page 8, expected page 0"):
        dst.send_have(8, b"\x00", 8)
    with pytest.raises(RemoteProtocolError, match="HAVE from page 8, expected page 0"):
        events(src, dst._sealed(frame(FrameType.HAVE, struct.pack("!QII", 8, 8, 0) + b"\x00")))


@pytest.mark.parametrize(
    ("before", "frame_of", "message"),
    [
        ([], lambda s: s.send_zero(0, 1), "ZERO is not allowed on the push channel while the destination is saying"),
        (["done"], lambda s: b"".join(s.send_pages(0, memoryview(bytes(PAGE_SIZE)))), "PAGES is not allowed"),
        (["done"], lambda s: s.send_done(1, 0), "DONE is not allowed"),
    ],
    ids=["pages-before-the-cover", "pages-after-done", "done-twice"],
)
def test_push_frames_out_of_phase_are_refused(before: list[str], frame_of, message: str) -> None:  # type: ignore[no-untyped-def]
    if before:
        src, dst = pushing()
        events(dst, src.send_done(0, 0))
    else:
        src, dst = connected(Channel.PUSH)
        events(dst, src.send_info(RAM))
    with pytest.raises(LocalProtocolError, match=message.split(" while")[0]):
        frame_of(src)  # the source's codec will not send it
    forged = Connection(Role.SOURCE, Channel.PUSH, KEY, MIGRATION)  # a source whose phase allows it
    forged.state, forged.push_phase, forged.ram_size = State.RELEASED, PushPhase.PUSHING, RAM
    forged._send_mac = src._send_mac  # with the source's frame key: it passes the MAC check
    with pytest.raises(RemoteProtocolError, match=message):
        events(dst, frame_of(forged))


def test_complete_comes_only_after_the_cover() -> None:
    src, dst = connected(Channel.PUSH)
    events(dst, src.send_info(RAM))
    with pytest.raises(LocalProtocolError, match="COMPLETE is not allowed"):
        dst.send_complete()


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
        (lambda s, d: s._sealed(HEADER.pack(FrameType.PAGES, 0, 0, 16 + PAGE_SIZE) + struct.pack("!QII", 0, 2, 0)
                                + bytes(PAGE_SIZE)), "PAGES run of 2 pages"),
        (lambda s, d: s._sealed(frame(FrameType.DONE, bytes(8))), "expected 16"),
    ],
    ids=["oversized", "unknown-type", "flags", "wrong-direction", "second-hello", "out-of-range", "unaligned",
         "short-run", "short-done"],
)
def test_malformed_frames_put_the_connection_in_error(build, message: str) -> None:  # type: ignore[no-untyped-def]
    src, dst = pushing()
    with pytest.raises(RemoteProtocolError, match=message):
        events(dst, build(src, dst))
    assert dst.state is State.ERROR
    assert dst.next_event() is None


def test_no_page_is_sent_or_taken_before_the_source_says_released() -> None:
    src, dst = connected(Channel.PUSH, release=False)
    events(dst, src.send_info(RAM))
    for send in (lambda: src.send_pages(0, memoryview(bytes(PAGE_SIZE))), lambda: src.send_zero(0, 1),
                 lambda: src.send_done(1, 0)):
        with pytest.raises(LocalProtocolError, match="before RELEASED"):
            send()
    with pytest.raises(RemoteProtocolError, match="before the source's RELEASED"):
        events(dst, frame(FrameType.ZERO, struct.pack("!QQ", 0, 1)))
    assert dst.state is State.ERROR


def test_only_the_source_says_released() -> None:
    src, dst = connected(Channel.DEMAND, release=False)
    with pytest.raises(LocalProtocolError):
        dst.send_released()
    with pytest.raises(RemoteProtocolError, match="RELEASED is not allowed"):
        events(src, frame(FrameType.RELEASED))


def test_pages_before_authentication_are_refused() -> None:
    dst = Connection(Role.DESTINATION, Channel.DEMAND, KEY, MIGRATION)
    assert len(dst.receive_buffer()) <= PREAUTH_BUFFER, "a buffer of a whole frame before the peer is known"
    with pytest.raises(RemoteProtocolError, match="PAGES is not allowed"):
        events(dst, HEADER.pack(FrameType.PAGES, 0, 0, 16 + PAGE_SIZE) + struct.pack("!QII", 0, 1, 0))


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
        src.send_pages(0, memoryview(bytes(PAGE_SIZE * (MAX_RUN_PAGES + 1))))


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=4096))
def test_random_bytes_only_ever_raise_remote_protocol_errors(data: bytes) -> None:
    for role in Role:
        conn = Connection(role, Channel.PUSH, KEY, MIGRATION)
        try:
            events(conn, data)
            events(conn, b"")
        except RemoteProtocolError:
            assert conn.state is State.ERROR


@settings(deadline=None, max_examples=100)
@given(st.lists(st.integers(min_value=1, max_value=9000), min_size=1, max_size=20))
def test_any_split_of_a_stream_gives_the_same_events(cuts: list[int]) -> None:
    src, dst = pushing()
    stream = (b"".join(src.send_pages(PAGE_SIZE, memoryview(bytes([7]) * 3 * PAGE_SIZE)))
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
    assert [name for name, _ in got] == ["Pages", "Zero", "Done"]
    assert got[0][1] == bytes([7]) * 3 * PAGE_SIZE


@settings(deadline=None, max_examples=200)
@given(st.integers(min_value=0, max_value=len(frame(FrameType.ZERO, bytes(16))) - 1), st.integers(0, 255))
def test_any_corrupted_byte_is_caught_or_harmless(position: int, value: int) -> None:
    src, dst = pushing()
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



def _page_frames(src: Connection) -> list[bytes]:
    return [b"".join(src.send_pages(i * PAGE_SIZE, memoryview(bytes([i]) * PAGE_SIZE))) for i in range(3)]


@pytest.mark.parametrize(
    "tamper",
    [
        lambda f: [f[0][:-MAC_SIZE - 1] + bytes([f[0][-MAC_SIZE - 1] ^ 1]) + f[0][-MAC_SIZE:]],  # flip a data bit
        lambda f: [f[0], f[0]],  # replay
        lambda f: [f[1]],  # drop the first
        lambda f: [f[1], f[0]],  # reorder
        lambda f: [frame(FrameType.ZERO, struct.pack("!QQ", 0, 1)) + bytes(MAC_SIZE)],  # inject, a made-up MAC
    ],
    ids=["flip", "replay", "drop", "reorder", "inject"],
)
def test_a_tampered_frame_is_refused_before_it_is_looked_at(tamper) -> None:  # type: ignore[no-untyped-def]
    src, dst = connected()
    events(dst, src.send_info(RAM))
    frames = _page_frames(src)
    got: list[Event] = []
    with pytest.raises(RemoteProtocolError, match="frame MAC mismatch"):
        for data in tamper(frames):
            got += events(dst, data)
    assert all(isinstance(e, Pages) and bytes(e.data) == bytes([e.offset // PAGE_SIZE]) * PAGE_SIZE for e in got)
    assert dst.state is State.ERROR
    assert b"frame MAC mismatch" in dst.data_to_send()  # the peer is told why


def test_a_frame_from_another_connection_with_the_same_key_is_refused() -> None:
    """A relay through a second session of the same migration and key cannot move frames across."""
    src1, _ = connected()
    src2, dst2 = connected()
    events(dst2, src2.send_info(RAM))
    with pytest.raises(RemoteProtocolError, match="frame MAC mismatch"):
        events(dst2, src1.send_info(RAM))


def test_frames_inside_tls_carry_no_mac_and_the_mode_is_bound_into_auth() -> None:
    src = Connection(Role.SOURCE, Channel.DEMAND, KEY, MIGRATION, frame_macs=False)
    dst = Connection(Role.DESTINATION, Channel.DEMAND, KEY, MIGRATION, frame_macs=False)
    events(src, dst.data_to_send())
    events(dst, src.data_to_send())
    events(src, dst.data_to_send())
    events(dst, src.data_to_send())
    assert src.send_info(RAM) == frame(FrameType.INFO, struct.pack("!QII", RAM, PAGE_SIZE, 0))
    mixed_src = Connection(Role.SOURCE, Channel.DEMAND, KEY, MIGRATION, frame_macs=False)
    mixed_dst = Connection(Role.DESTINATION, Channel.DEMAND, KEY, MIGRATION)
    events(mixed_src, mixed_dst.data_to_send())
    with pytest.raises(RemoteProtocolError, match="authentication failed"):
        events(mixed_dst, mixed_src.data_to_send())  # the source's HELLO, then its AUTH


def test_keepalives_carry_no_event_and_the_buffer_grows_only_after_auth() -> None:
    src, dst = connected()
    assert len(dst.receive_buffer()) == MAX_FRAME
    assert events(dst, src.send_keepalive() + src.send_info(RAM) + src.send_keepalive()) == [Info(RAM)]
    assert events(src, dst.send_keepalive()) == []


def test_a_have_beyond_the_ram_size_is_refused_by_the_source() -> None:
    """An out-of-range HAVE made the push spin without DONE (issue 11, finding 7)."""
    src, dst = connected(Channel.PUSH)
    events(dst, src.send_info(RAM))
    forged = dst._sealed(frame(FrameType.HAVE, struct.pack("!QII", 0, PAGES + 8, 0) + bytes((PAGES + 8 + 7) // 8)))
    with pytest.raises(RemoteProtocolError, match="beyond the RAM size"):
        events(src, forged)
    assert src.state is State.ERROR
