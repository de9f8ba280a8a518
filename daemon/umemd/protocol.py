"""The umem wire protocol, sans-I/O: bytes in, events out; events in, bytes out.

Theory of operation (docs/protocol.md has the byte layouts):

A :class:`Connection` is one side of one TCP connection: a role (source or
destination) and a channel (demand or push). The caller moves bytes; the
codec parses and checks frames, runs the handshake, and says what happened
as events::

    conn = Connection(Role.DESTINATION, Channel.DEMAND, key, migration_id)
    sock.sendall(conn.data_to_send())          # our HELLO
    while True:
        n = sock.recv_into(conn.receive_buffer())
        conn.received(n)                       # 0 means end of file
        while (event := conn.next_event()) is not None:
            ...                                # Authenticated, Info, Pages, ...
        sock.sendall(conn.data_to_send())      # our AUTH, once the peer said HELLO

Every transition is in :data:`TRANSITIONS`: (state, frame type) -> next
state, with the frames a side may receive in READY further limited by its
role and channel (:data:`ACCEPTS`). A frame the peer may not send raises
:class:`RemoteProtocolError` and leaves the connection in ERROR; sending
what we may not send raises :class:`LocalProtocolError` (our bug).

Both sides of every connection name the migration they belong to (a
16-byte migration id, in HELLO and bound into AUTH): a peer of another
migration is refused before AUTH, naming both ids, so a stale daemon can
never feed or drain a migration that is not its own.

Integrity after the handshake (key-only mode): every frame a side sends
after its AUTH carries a MAC (:data:`MAC_SIZE` bytes after the payload):
keyed BLAKE2b under a key of that direction of that connection (derived
from the shared key, both nonces, the channel and the migration id) over
the frame's sequence number in that direction and the frame. A frame that
was altered, forged, replayed, dropped, reordered or moved from another
connection fails it, and the connection goes to ERROR before the frame is
looked at. Inside TLS (``frame_macs=False``, bound into AUTH) the TLS
records carry the integrity instead. Integrity, not confidentiality: pages
travel in the clear without TLS.

Until the peer's AUTH is verified the receive buffer holds only what a
handshake needs (:data:`PREAUTH_BUFFER`); then it grows to one largest
frame. A PAGES payload is handed out as a memoryview into it, valid until
the next ``received``.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from umemd.errors import AuthenticationError, LocalProtocolError, MigrationMismatchError, RemoteProtocolError

MAGIC = b"UMEMWIRE"
VERSION = 3
PAGE_SIZE = 4096  # the page of the wire, the device and the RAM file: umem's one page size (x86-64)
NONCE_SIZE = 16
MIGRATION_ID_SIZE = 16
TAG_SIZE = 32
MAX_REQUEST_PAGES = 256
MAX_RUN_PAGES = 1024
MAX_HAVE_PAGES = 512 * 1024
MAX_REASON = 256
AUTH_LABEL = b"umem-auth-v3"
FRAME_KEY_LABEL = b"umem-frame-key-v3"
MAC_SIZE = 16  # keyed BLAKE2b-128 after every frame past the sender's AUTH (key-only mode)

HEADER = struct.Struct("!BBHI")
HELLO_PREFIX = struct.Struct("!8sH")  # magic, version: the same in every version
HELLO = struct.Struct("!8sHBBI16s16s")  # ... role, channel, flags, nonce, migration id
HELLO_CHANNEL = HELLO_PREFIX.size + 1  # offset of the channel byte in a HELLO payload (after the role)
# HELLO flags: the optional features a side offers; a connection uses those both offer, and an
# unknown bit is an offer this side declines (so a later release adds frames without a new
# version). Version 2 defines none.
OFFERED_FEATURES = 0
INFO = struct.Struct("!QII")
COUNT = struct.Struct("!II")
RUN = struct.Struct("!QII")
ZERO = struct.Struct("!QQ")
HAVE = struct.Struct("!QII")
DONE = struct.Struct("!QQ")
ERROR = struct.Struct("!HH")


class Role(enum.IntEnum):
    SOURCE = 1
    DESTINATION = 2


class Channel(enum.IntEnum):
    DEMAND = 1
    PUSH = 2


class FrameType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    INFO = 3
    REQUEST = 4
    PAGES = 5
    ZERO = 6
    HAVE = 7
    DONE = 8
    ERROR = 9
    COMPLETE = 10
    RELEASED = 11
    KEEPALIVE = 12


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    VERSION = 2
    AUTH = 3
    SIZE_MISMATCH = 4
    INTERNAL = 5
    SHUTDOWN = 6
    MIGRATION = 7
    ABORTED = 8


class State(enum.Enum):
    HELLO = "waiting for the peer's HELLO"
    AUTH = "waiting for the peer's AUTH"
    READY = "ready"
    RELEASED = "released"  # the source said RELEASED: pages may flow
    CLOSED = "closed"
    ERROR = "error"


# Largest payload of each frame type, checked before the payload is buffered.
MAX_PAYLOAD = {
    FrameType.HELLO: 256,  # longer than ours, so a later version's HELLO gets the version error
    FrameType.AUTH: TAG_SIZE,
    FrameType.INFO: INFO.size,
    FrameType.REQUEST: COUNT.size + 8 * MAX_REQUEST_PAGES,
    FrameType.PAGES: RUN.size + PAGE_SIZE * MAX_RUN_PAGES,
    FrameType.ZERO: ZERO.size,
    FrameType.HAVE: HAVE.size + MAX_HAVE_PAGES // 8,
    FrameType.DONE: DONE.size,
    FrameType.ERROR: ERROR.size + MAX_REASON,
    FrameType.COMPLETE: 0,
    FrameType.RELEASED: 0,
    FrameType.KEEPALIVE: 0,
}
MAX_FRAME = HEADER.size + max(MAX_PAYLOAD.values()) + MAC_SIZE
# What the handshake can need at once: the peer's HELLO, AUTH or ERROR, and the first frame behind them.
PREAUTH_BUFFER = 4 * (HEADER.size + MAX_PAYLOAD[FrameType.ERROR] + MAC_SIZE)
_HANDSHAKE_FRAMES = (FrameType.HELLO, FrameType.AUTH, FrameType.ERROR)

# (state, frame received) -> next state. ERROR from the peer closes in any state.
# READY -> RELEASED when the source's RELEASED is received (destination) or
# sent (source, see send_released): no page, ZERO hint or DONE is sent or
# accepted before it, so a page can never be taken before the release.
_BEFORE_RELEASE = (FrameType.INFO, FrameType.REQUEST, FrameType.HAVE, FrameType.COMPLETE)
_PAGE_FRAMES = (FrameType.PAGES, FrameType.ZERO, FrameType.DONE)
TRANSITIONS: dict[tuple[State, FrameType], State] = {
    (State.HELLO, FrameType.HELLO): State.AUTH,
    (State.AUTH, FrameType.AUTH): State.READY,
    **{(s, FrameType.ERROR): State.CLOSED for s in (State.HELLO, State.AUTH, State.READY, State.RELEASED)},
    **{(State.READY, t): State.READY for t in (*_BEFORE_RELEASE, FrameType.KEEPALIVE)},
    (State.READY, FrameType.RELEASED): State.RELEASED,
    **{(State.RELEASED, t): State.RELEASED for t in (*_BEFORE_RELEASE, *_PAGE_FRAMES, FrameType.KEEPALIVE)},
}
LIVE = (State.READY, State.RELEASED)

class PushPhase(enum.Enum):
    """Where the push channel is, the same on both sides (frames of either direction move it)."""

    COVER = "the destination is saying which pages it has (HAVE, in order from page 0)"
    PUSHING = "the source is pushing the pages not covered"
    DONE = "the source has pushed everything (DONE)"
    COMPLETE = "the destination has every page (COMPLETE)"


# (push phase, push frame) -> next phase. HAVE moves COVER on to PUSHING once
# its runs, in order from page 0, have covered every page (see _cover). After
# COMPLETE the pages the source had on the wire may still arrive.
PUSH_TRANSITIONS: dict[tuple[PushPhase, FrameType], PushPhase] = {
    (PushPhase.COVER, FrameType.HAVE): PushPhase.COVER,
    **{(PushPhase.PUSHING, t): PushPhase.PUSHING for t in (FrameType.PAGES, FrameType.ZERO)},
    (PushPhase.PUSHING, FrameType.DONE): PushPhase.DONE,
    **{(p, FrameType.COMPLETE): PushPhase.COMPLETE for p in (PushPhase.PUSHING, PushPhase.DONE)},
    **{(PushPhase.COMPLETE, t): PushPhase.COMPLETE for t in (FrameType.PAGES, FrameType.ZERO, FrameType.DONE)},
}
PUSH_FRAMES = frozenset(kind for _, kind in PUSH_TRANSITIONS)

# What each side may receive in READY, by (our role, channel). KEEPALIVE (either side, when it
# has sent nothing for a while) carries no event: its bytes are the proof of life.
ACCEPTS: dict[tuple[Role, Channel], frozenset[FrameType]] = {
    (Role.SOURCE, Channel.DEMAND): frozenset({FrameType.REQUEST, FrameType.ERROR, FrameType.KEEPALIVE}),
    (Role.SOURCE, Channel.PUSH): frozenset({FrameType.HAVE, FrameType.COMPLETE, FrameType.ERROR,
                                            FrameType.KEEPALIVE}),
    (Role.DESTINATION, Channel.DEMAND): frozenset(
        {FrameType.INFO, FrameType.RELEASED, FrameType.PAGES, FrameType.ZERO, FrameType.ERROR, FrameType.KEEPALIVE}
    ),
    (Role.DESTINATION, Channel.PUSH): frozenset(
        {FrameType.INFO, FrameType.RELEASED, FrameType.PAGES, FrameType.ZERO, FrameType.DONE, FrameType.ERROR,
         FrameType.KEEPALIVE}
    ),
}


# ---- events ----------------------------------------------------------------


@dataclass(frozen=True)
class Authenticated:
    """Both HELLOs exchanged and the peer's AUTH verified."""

    peer_role: Role
    channel: Channel


@dataclass(frozen=True)
class Info:
    ram_size: int
    page_size: int = PAGE_SIZE


@dataclass(frozen=True)
class Request:
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Pages:
    """A run of pages; ``data`` is a view into the receive buffer."""

    offset: int
    data: memoryview

    @property
    def count(self) -> int:
        return len(self.data) // PAGE_SIZE


@dataclass(frozen=True)
class Zero:
    offset: int
    count: int


@dataclass(frozen=True)
class Have:
    first: int
    count: int
    bitmap: bytes

    def present(self) -> list[int]:
        """Page indices whose bit is set."""
        bits = int.from_bytes(self.bitmap, "little")
        return [self.first + i for i in range(self.count) if bits >> i & 1]


@dataclass(frozen=True)
class Done:
    pages: int
    zeros: int


@dataclass(frozen=True)
class Complete:
    """The destination has every page: the source may stop serving."""


@dataclass(frozen=True)
class Released:
    """The source guest is stopped for the switch-over for good: pages follow."""


@dataclass(frozen=True)
class PeerError:
    code: int
    reason: str


@dataclass(frozen=True)
class Closed:
    """The peer closed the connection (end of file)."""


Event = Authenticated | Info | Released | Request | Pages | Zero | Have | Done | Complete | PeerError | Closed


def auth_tag(key: bytes, sender: Role, channel: Channel, sender_nonce: bytes, receiver_nonce: bytes,
             migration_id: bytes, frame_macs: bool) -> bytes:
    message = (AUTH_LABEL + bytes([sender, channel, frame_macs]) + sender_nonce + receiver_nonce
               + migration_id)
    return hmac.new(key, message, hashlib.sha256).digest()


def frame_key(key: bytes, sender: Role, channel: Channel, source_nonce: bytes, destination_nonce: bytes,
              migration_id: bytes) -> bytes:
    """The MAC key of the frames ``sender`` sends on one connection."""
    message = FRAME_KEY_LABEL + bytes([sender, channel]) + source_nonce + destination_nonce + migration_id
    return hmac.new(key, message, hashlib.sha256).digest()


class FrameMac:
    """The MACs of one direction of one connection: each frame's tag covers its sequence number."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self.sequence = 0

    def tag(self, *parts: bytes | memoryview) -> bytes:
        mac = hashlib.blake2b(self.sequence.to_bytes(8, "big"), key=self._key, digest_size=MAC_SIZE)
        for part in parts:
            mac.update(part)
        self.sequence += 1
        return mac.digest()


def _our_bug(reason: str) -> NoReturn:
    raise LocalProtocolError(reason)


def hello_length(header: bytes) -> int:
    """The payload length in the header of a connecting peer's first frame, which must be a HELLO
    of any protocol version with a channel byte (the listening side reads that whole frame first)."""
    kind, _, _, length = HEADER.unpack(header)
    if kind != FrameType.HELLO or length > MAX_PAYLOAD[FrameType.HELLO] or length <= HELLO_CHANNEL:
        raise RemoteProtocolError("the peer did not start with a umem HELLO")
    return int(length)


def hello_channel(hello: bytes) -> int:
    """The channel a whole HELLO frame (header included) names, valid or not."""
    return hello[HEADER.size + HELLO_CHANNEL]


def frame(kind: FrameType, payload: bytes = b"") -> bytes:
    return HEADER.pack(kind, 0, 0, len(payload)) + payload


class Connection:
    """One side of one connection. See the module docstring."""

    def __init__(self, role: Role, channel: Channel, key: bytes, migration_id: bytes, *,
                 ram_size: int | None = None, nonce: bytes | None = None, frame_macs: bool = True) -> None:
        if len(key) < 32:
            raise LocalProtocolError("the key must be at least 32 bytes (umemd keygen FILE makes one)")
        if len(migration_id) != MIGRATION_ID_SIZE:
            raise LocalProtocolError(f"a migration id is {MIGRATION_ID_SIZE} bytes, not {len(migration_id)}")
        self.migration_id = migration_id
        self.role = role
        self.channel = channel
        self.peer_role = Role.DESTINATION if role is Role.SOURCE else Role.SOURCE
        self.state = State.HELLO
        self.ram_size = ram_size  # checked against offsets once known (INFO)
        self._key = key
        self._nonce = nonce or os.urandom(NONCE_SIZE)
        self._peer_nonce = b""
        self.frame_macs = frame_macs  # False inside TLS, whose records carry the integrity
        self._send_mac: FrameMac | None = None  # from our AUTH on
        self._receive_mac: FrameMac | None = None  # from the peer's AUTH on
        self._buffer = bytearray(PREAUTH_BUFFER)  # grows to MAX_FRAME once the peer is authenticated
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._eof = False
        self.features = 0  # negotiated at the peer's HELLO
        self.push_phase = PushPhase.COVER if channel is Channel.PUSH else None
        self._covered = 0  # pages the HAVE runs have covered so far
        self._outgoing = bytearray(frame(FrameType.HELLO, HELLO.pack(MAGIC, VERSION, role, channel, OFFERED_FEATURES,
                                                                    self._nonce, migration_id)))

    # ---- receiving ----------------------------------------------------------

    def receive_buffer(self) -> memoryview:
        """Where to ``recv_into`` the next bytes (then call :meth:`received`).

        Drain :meth:`next_event` first: the buffer holds one largest frame,
        and views handed out in earlier events become invalid here.
        """
        if self._start:
            pending = self._end - self._start
            self._buffer[:pending] = self._buffer[self._start:self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buffer)[self._end:]

    def received(self, nbytes: int) -> None:
        """``nbytes`` were written at the start of :meth:`receive_buffer`; 0 is end of file."""
        if nbytes == 0:
            self._eof = True
        self._end += nbytes

    def receive_data(self, data: bytes) -> None:
        """Feed ``data`` (b"" for end of file), for callers that do not ``recv_into``."""
        if not data:
            self.received(0)
        while data:
            target = self.receive_buffer()
            if not target:
                raise RemoteProtocolError("receive buffer full: the caller must drain events first")
            n = min(len(target), len(data))
            target[:n] = data[:n]
            self.received(n)
            data = data[n:]

    def next_event(self) -> Event | None:
        """The next event, or None when more data is needed."""
        if self.state in (State.CLOSED, State.ERROR):
            return None
        available = self._end - self._start
        if available < HEADER.size:
            return self._eof_event(available)
        kind_raw, flags, reserved, length = HEADER.unpack_from(self._buffer, self._start)
        kind = self._check_header(kind_raw, flags, reserved, length)
        next_state = self._transition(kind)
        start, end = self._start, self._start + HEADER.size + length
        trailer = MAC_SIZE if self._receive_mac else 0
        if end + trailer - start > len(self._buffer):
            self._fail(f"{kind.name} frame of {length} bytes during the handshake")
        if available < end + trailer - start:
            return self._eof_event(available)
        if self._receive_mac:
            self._verify_mac(kind, start, end)
        self._start = end + trailer
        self.state = next_state
        if self.push_phase is not None and kind in PUSH_FRAMES:
            self.push_phase = self._push_step(kind, self._fail)
        return self._handle(kind, memoryview(self._buffer)[start + HEADER.size:end])  # a bad payload: ERROR

    def _verify_mac(self, kind: FrameType, start: int, end: int) -> None:
        assert self._receive_mac is not None
        sequence = self._receive_mac.sequence
        expected = self._receive_mac.tag(memoryview(self._buffer)[start:end])
        if not hmac.compare_digest(expected, bytes(self._buffer[end:end + MAC_SIZE])):
            self._outgoing += self.error_frame(ErrorCode.PROTOCOL, f"frame MAC mismatch at frame {sequence}")
            self._fail(f"frame MAC mismatch at frame {sequence} ({kind.name}) from the "
                       f"{self.peer_role.name.lower()} on the {self.channel.name.lower()} channel: it was altered, "
                       "forged, replayed, dropped or reordered on the way (an on-path attacker or a broken relay)")

    def _eof_event(self, available: int) -> Event | None:
        if not self._eof:
            return None
        if available:
            self._fail("the connection closed in the middle of a frame")
        self.state = State.CLOSED
        return Closed()

    def _check_header(self, kind_raw: int, flags: int, reserved: int, length: int) -> FrameType:
        try:
            kind = FrameType(kind_raw)
        except ValueError:
            self._fail(f"unknown frame type {kind_raw}")
        if flags or reserved:
            self._fail(f"{kind.name} frame with nonzero flags or reserved bits")
        if length > MAX_PAYLOAD[kind]:
            self._fail(f"{kind.name} frame of {length} bytes exceeds its limit of {MAX_PAYLOAD[kind]}")
        return kind

    def _transition(self, kind: FrameType) -> State:
        next_state = TRANSITIONS.get((self.state, kind))
        if next_state is None or (self.state in LIVE and kind not in ACCEPTS[self.role, self.channel]):
            before = " (before the source's RELEASED)" if kind in _PAGE_FRAMES and self.state is State.READY else ""
            self._fail(f"{kind.name} is not allowed from a {self.peer_role.name.lower()} "
                       f"on the {self.channel.name.lower()} channel while {self.state.value}{before}")
        return next_state

    def _push_step(self, kind: FrameType, fail: Callable[[str], NoReturn]) -> PushPhase:
        assert self.push_phase is not None
        phase = PUSH_TRANSITIONS.get((self.push_phase, kind))
        if phase is None:
            fail(f"{kind.name} is not allowed on the push channel while {self.push_phase.value}")
        return phase

    def _cover(self, first: int, count: int, fail: Callable[[str], NoReturn]) -> None:
        """One HAVE run: it must start where the last one ended; the last one ends the cover."""
        if self.ram_size is None:
            fail("HAVE before INFO")
        if first != self._covered:
            fail(f"HAVE from page {first}, expected page {self._covered} (runs go in order from page 0)")
        self._covered += count
        if self._covered == self.ram_size // PAGE_SIZE:
            self.push_phase = PushPhase.PUSHING

    def _fail(self, reason: str) -> NoReturn:
        self.state = State.ERROR
        raise RemoteProtocolError(reason)

    # ---- frame handlers -------------------------------------------------------

    def _handle(self, kind: FrameType, payload: memoryview) -> Event | None:
        if kind is FrameType.HELLO:
            self._on_hello(payload)
            return self.next_event()
        if kind is FrameType.KEEPALIVE:
            if payload:
                self._fail("KEEPALIVE with a payload")
            return self.next_event()
        if kind is FrameType.AUTH:
            return self._on_auth(payload)
        if kind is FrameType.ERROR:
            return self._on_error(payload)
        if kind is FrameType.INFO:
            return self._on_info(payload)
        if kind is FrameType.REQUEST:
            return self._on_request(payload)
        if kind is FrameType.PAGES:
            return self._on_pages(payload)
        if kind is FrameType.ZERO:
            offset, count = self._unpack(ZERO, payload, kind)
            self._check_run(offset, count, kind)
            return Zero(offset, count)
        if kind is FrameType.HAVE:
            return self._on_have(payload)
        if kind is FrameType.COMPLETE:
            return Complete()
        if kind is FrameType.RELEASED:
            return Released()
        pages, zeros = self._unpack(DONE, payload, kind)
        return Done(pages, zeros)

    def _unpack(self, layout: struct.Struct, payload: memoryview, kind: FrameType) -> tuple[int, ...]:
        if len(payload) != layout.size:
            self._fail(f"{kind.name} payload of {len(payload)} bytes, expected {layout.size}")
        values: tuple[int, ...] = layout.unpack(payload)
        return values

    def _on_hello(self, payload: memoryview) -> None:
        if len(payload) < HELLO_PREFIX.size:
            self._fail(f"HELLO payload of {len(payload)} bytes, expected {HELLO.size}")
        magic, version = HELLO_PREFIX.unpack_from(payload)
        if magic != MAGIC:
            self._fail("not a umem peer (bad magic)")
        if version != VERSION:
            reason = (f"the peer speaks umem protocol version {version}, this umemd speaks {VERSION}: "
                      "run the same umemd release on both hosts")
            self._outgoing += self.error_frame(ErrorCode.VERSION, reason)
            self._fail(reason)
        if len(payload) != HELLO.size:
            self._fail(f"HELLO payload of {len(payload)} bytes, expected {HELLO.size}")
        _, _, role, channel, flags, nonce, migration_id = HELLO.unpack(payload)
        if role != self.peer_role or channel != self.channel:
            self._fail(f"peer is role {role} on channel {channel}, expected a "
                       f"{self.peer_role.name.lower()} on the {self.channel.name.lower()} channel")
        if migration_id != self.migration_id:
            self._refuse_migration(migration_id)
        self.features = flags & OFFERED_FEATURES
        self._peer_nonce = nonce
        self._outgoing += frame(FrameType.AUTH, auth_tag(self._key, self.role, self.channel, self._nonce, nonce,
                                                         self.migration_id, self.frame_macs))
        if self.frame_macs:
            self._send_mac = FrameMac(self._frame_key(self.role))

    def _frame_key(self, sender: Role) -> bytes:
        source, destination = ((self._nonce, self._peer_nonce) if self.role is Role.SOURCE
                               else (self._peer_nonce, self._nonce))
        return frame_key(self._key, sender, self.channel, source, destination, self.migration_id)

    def _refuse_migration(self, theirs: bytes) -> NoReturn:
        reason = (f"the {self.peer_role.name.lower()} belongs to migration {theirs.hex()}, this "
                  f"{self.role.name.lower()} to migration {self.migration_id.hex()}: a daemon left from another "
                  "migration? (both daemons need the same --migration-id)")
        self._outgoing += self.error_frame(ErrorCode.MIGRATION, reason)
        self.state = State.ERROR
        raise MigrationMismatchError(reason)

    def _on_auth(self, payload: memoryview) -> Event:
        expected = auth_tag(self._key, self.peer_role, self.channel, self._peer_nonce, self._nonce,
                            self.migration_id, self.frame_macs)
        if not hmac.compare_digest(bytes(payload), expected):
            self._outgoing += self.error_frame(ErrorCode.AUTH, "authentication failed")
            self.state = State.ERROR
            raise AuthenticationError("authentication failed: the peer does not hold our key (the same "
                                      "--key-file on both hosts?), or one side uses TLS and the other not")
        if self.frame_macs:
            self._receive_mac = FrameMac(self._frame_key(self.peer_role))
        self._grow_buffer()
        return Authenticated(self.peer_role, self.channel)

    def _grow_buffer(self) -> None:
        """Room for one largest frame, now that the peer holds the key."""
        pending = self._end - self._start
        buffer = bytearray(MAX_FRAME)
        buffer[:pending] = self._buffer[self._start:self._end]
        self._buffer, self._start, self._end = buffer, 0, pending

    def _on_error(self, payload: memoryview) -> Event:
        if len(payload) < ERROR.size:
            self._fail("ERROR frame too short")
        code, _ = ERROR.unpack_from(payload)
        return PeerError(code, bytes(payload[ERROR.size:]).decode(errors="replace"))

    def _on_info(self, payload: memoryview) -> Event:
        ram_size, page_size, reserved = self._unpack(INFO, payload, FrameType.INFO)
        if reserved or page_size != PAGE_SIZE or not ram_size or ram_size % PAGE_SIZE:
            self._fail(f"INFO with RAM size {ram_size} and page size {page_size} is not usable")
        self.ram_size = ram_size
        return Info(ram_size, page_size)

    def _on_request(self, payload: memoryview) -> Event:
        if len(payload) < COUNT.size:
            self._fail("REQUEST frame too short")
        count, reserved = COUNT.unpack_from(payload)
        if reserved or not 1 <= count <= MAX_REQUEST_PAGES or len(payload) != COUNT.size + 8 * count:
            self._fail(f"REQUEST of {count} pages in {len(payload)} bytes")
        offsets = struct.unpack_from(f"!{count}Q", payload, COUNT.size)
        for offset in offsets:
            self._check_run(offset, 1, FrameType.REQUEST)
        return Request(offsets)

    def _on_pages(self, payload: memoryview) -> Event:
        if len(payload) < RUN.size:
            self._fail("PAGES frame too short")
        offset, count, reserved = RUN.unpack_from(payload)
        if reserved or not 1 <= count <= MAX_RUN_PAGES or len(payload) != RUN.size + count * PAGE_SIZE:
            self._fail(f"PAGES run of {count} pages in {len(payload)} bytes")
        self._check_run(offset, count, FrameType.PAGES)
        return Pages(offset, payload[RUN.size:])

    def _on_have(self, payload: memoryview) -> Event:
        if len(payload) < HAVE.size:
            self._fail("HAVE frame too short")
        first, count, reserved = HAVE.unpack_from(payload)
        if reserved or not 1 <= count <= MAX_HAVE_PAGES or len(payload) != HAVE.size + (count + 7) // 8:
            self._fail(f"HAVE of {count} pages in {len(payload)} bytes")
        self._check_run(first * PAGE_SIZE, count, FrameType.HAVE)
        self._cover(first, count, self._fail)
        return Have(first, count, bytes(payload[HAVE.size:]))

    def _check_run(self, offset: int, count: int, kind: FrameType) -> None:
        if offset % PAGE_SIZE or count < 1:
            self._fail(f"{kind.name} at unaligned offset {offset:#x} or of {count} pages")
        if self.ram_size is not None and offset + count * PAGE_SIZE > self.ram_size:
            self._fail(f"{kind.name} of {count} pages at {offset:#x} is beyond the RAM size {self.ram_size:#x}")

    # ---- sending --------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Bytes the codec itself has queued (HELLO, AUTH, an ERROR); empties the queue."""
        out, self._outgoing = bytes(self._outgoing), bytearray()
        return out

    def _require_ready(self, kind: FrameType) -> None:
        if self.state not in LIVE:
            raise LocalProtocolError(f"cannot send {kind.name} while {self.state.value}")
        if kind in _PAGE_FRAMES and self.state is not State.RELEASED:
            raise LocalProtocolError(f"cannot send {kind.name} before RELEASED")
        if kind not in ACCEPTS[self.peer_role, self.channel]:
            raise LocalProtocolError(f"a {self.role.name.lower()} does not send {kind.name} "
                                     f"on the {self.channel.name.lower()} channel")
        if self.push_phase is not None and kind in PUSH_FRAMES:
            self.push_phase = self._push_step(kind, _our_bug)

    def _sealed(self, data: bytes) -> bytes:
        """``data`` with its MAC once our AUTH is out (key-only mode)."""
        return data + self._send_mac.tag(data) if self._send_mac else data

    def send_info(self, ram_size: int) -> bytes:
        """INFO; from then on what the peer sends is bounded by ``ram_size`` here too."""
        self._require_ready(FrameType.INFO)
        self.ram_size = ram_size
        return self._sealed(frame(FrameType.INFO, INFO.pack(ram_size, PAGE_SIZE, 0)))

    def send_request(self, offsets: list[int]) -> bytes:
        """One or more REQUEST frames for ``offsets`` (any number)."""
        self._require_ready(FrameType.REQUEST)
        out = bytearray()
        for i in range(0, len(offsets), MAX_REQUEST_PAGES):
            chunk = offsets[i:i + MAX_REQUEST_PAGES]
            out += self._sealed(frame(FrameType.REQUEST, COUNT.pack(len(chunk), 0)
                                      + struct.pack(f"!{len(chunk)}Q", *chunk)))
        return bytes(out)

    def send_pages(self, offset: int, data: memoryview) -> tuple[bytes, memoryview, bytes]:
        """A PAGES frame of ``data`` (whole pages at ``offset``) as its header, the data itself (never
        copied here: ``sock.sendmsg`` them in order) and its MAC (b"" inside TLS)."""
        self._require_ready(FrameType.PAGES)
        count = len(data) // PAGE_SIZE
        if not 1 <= count <= MAX_RUN_PAGES or offset % PAGE_SIZE or len(data) % PAGE_SIZE:
            raise LocalProtocolError(f"PAGES run of {len(data)} bytes at {offset:#x}")
        header = HEADER.pack(FrameType.PAGES, 0, 0, RUN.size + len(data)) + RUN.pack(offset, count, 0)
        return header, data, self._send_mac.tag(header, data) if self._send_mac else b""

    def send_zero(self, offset: int, count: int) -> bytes:
        self._require_ready(FrameType.ZERO)
        return self._sealed(frame(FrameType.ZERO, ZERO.pack(offset, count)))

    def send_have(self, first: int, bitmap: bytes, count: int) -> bytes:
        self._require_ready(FrameType.HAVE)
        if not 1 <= count <= MAX_HAVE_PAGES or len(bitmap) != (count + 7) // 8:
            raise LocalProtocolError(f"HAVE of {count} pages with a {len(bitmap)}-byte bitmap")
        self._cover(first, count, _our_bug)
        return self._sealed(frame(FrameType.HAVE, HAVE.pack(first, count, 0) + bitmap))

    def send_done(self, pages: int, zeros: int) -> bytes:
        self._require_ready(FrameType.DONE)
        return self._sealed(frame(FrameType.DONE, DONE.pack(pages, zeros)))

    def send_released(self) -> bytes:
        """The source guest is stopped for good (the release): pages may follow."""
        self._require_ready(FrameType.RELEASED)
        if self.state is State.READY:
            self.state = State.RELEASED
        return self._sealed(frame(FrameType.RELEASED))

    def send_complete(self) -> bytes:
        self._require_ready(FrameType.COMPLETE)
        return self._sealed(frame(FrameType.COMPLETE))

    def send_keepalive(self) -> bytes:
        """Proof of life when nothing else was sent for a while (see transport.Link)."""
        self._require_ready(FrameType.KEEPALIVE)
        return self._sealed(frame(FrameType.KEEPALIVE))

    def error_frame(self, code: ErrorCode, reason: str) -> bytes:
        """An ERROR frame; allowed in every state (the connection is closed after it)."""
        return self._sealed(frame(FrameType.ERROR, ERROR.pack(code, 0) + reason.encode()[:MAX_REASON]))
