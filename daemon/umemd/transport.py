"""Sockets for the wire protocol: connect or listen, TLS, the handshake.

A :class:`Link` is one authenticated connection: a socket and its codec
(:class:`umemd.protocol.Connection`). A :class:`Dialer` makes links for one
role: it connects (retrying with backoff) or accepts on its listening
socket, whichever the user chose; either way each link's channel is the
one its first HELLO names.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from umemd.errors import ConnectError, MigrationMismatchError, RemoteProtocolError, UmemError
from umemd.protocol import (
    HEADER,
    MAX_PAYLOAD,
    Authenticated,
    Channel,
    Connection,
    ErrorCode,
    Event,
    FrameType,
    PeerError,
    Role,
)

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            raise UmemError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]") or "127.0.0.1", int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    ca: Path | None = None

    def context(self, server_side: bool) -> ssl.SSLContext:
        purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
        ctx = ssl.create_default_context(purpose, cafile=self.ca)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.check_hostname = False  # peers are named by address; the CA and the HMAC key authenticate
        ctx.verify_mode = ssl.CERT_REQUIRED if self.ca else ssl.CERT_NONE
        return ctx


class Link:
    """One authenticated connection of a channel."""

    def __init__(self, sock: socket.socket, conn: Connection, peer: str) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.channel = conn.channel
        self.bytes_in = 0
        self.pending: list[Event] = []  # events that arrived with the handshake's last bytes
        self._send_lock = threading.Lock()  # frames from two threads (e.g. an abort) never interleave

    def send(self, *parts: bytes | memoryview) -> None:
        """Send every part, in order, as one unit (no other thread's frame in between)."""
        with self._send_lock:
            self._send(parts)

    def try_send(self, data: bytes, wait: float) -> bool:
        """Send ``data`` unless another thread's send holds the link for ``wait`` seconds
        (a peer that stopped reading); whether it was sent. For a last word, e.g. an abort."""
        if not self._send_lock.acquire(timeout=wait):
            return False
        try:
            self._send((data,))
            return True
        except OSError:
            return False
        finally:
            self._send_lock.release()

    def _send(self, parts: tuple[bytes | memoryview, ...]) -> None:
        if isinstance(self.sock, ssl.SSLSocket):  # no sendmsg over TLS
            for part in parts:
                self.sock.sendall(part)
            return
        pending = [memoryview(p) for p in parts if len(p)]
        while pending:
            sent = self.sock.sendmsg(pending)
            while pending and sent >= len(pending[0]):
                sent -= len(pending[0])
                pending.pop(0)
            if pending and sent:
                pending[0] = pending[0][sent:]

    def flush(self) -> None:
        """Send what the codec queued (AUTH, an ERROR)."""
        data = self.conn.data_to_send()
        if data:
            self.send(data)

    def receive(self) -> list[Event]:
        """Events already received, or else read once (blocking) and return the
        events it completes; [Closed()] at end of file."""
        if self.pending:
            events, self.pending = self.pending, []
            return events
        n = self.sock.recv_into(self.conn.receive_buffer())
        self.bytes_in += n
        self.conn.received(n)
        events = []
        while (event := self.conn.next_event()) is not None:
            events.append(event)
        self.flush()
        return events

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Like :meth:`receive`, but read only if data arrives within ``timeout``
        seconds (0: don't wait); [] if nothing did."""
        if self.pending:
            return self.receive()
        buffered = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
        if buffered or select.select([self.sock], [], [], max(timeout, 0.0))[0]:
            return self.receive()
        return []

    def events(self) -> Iterator[Event]:
        """Every event until the peer closes; RemoteProtocolError on bad input."""
        while True:
            yield from self.receive()
            if self.conn.state.name in ("CLOSED", "ERROR"):
                return

    def shutdown(self) -> None:
        """Wake the thread that reads this link (it sees end of file) without closing the fd under it."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _handshake(sock: socket.socket, role: Role, key: bytes, migration_id: bytes, peer: str,
               channel: Channel | None) -> Link:
    """Run the handshake on a fresh socket; ``channel`` None: the one the peer's HELLO names."""
    sock.settimeout(HANDSHAKE_TIMEOUT)
    hello = b""
    if channel is None:
        hello = _read_hello(sock)
        named = hello[HEADER.size + 11]  # the channel byte of the HELLO payload
        # An invalid channel still gets a codec, which then refuses that HELLO with the reason.
        channel = Channel(named) if named in {c.value for c in Channel} else Channel.DEMAND
    conn = Connection(role, channel, key, migration_id)
    link = Link(sock, conn, peer)
    try:
        link.flush()  # our HELLO
        events = []
        if hello:
            conn.receive_data(hello)
            while (event := conn.next_event()) is not None:
                events.append(event)
            link.flush()
        while True:
            for i, event in enumerate(events):
                if isinstance(event, Authenticated):
                    sock.settimeout(None)
                    link.pending = events[i + 1:]  # e.g. the source's INFO, in the same segment
                    return link
                if isinstance(event, PeerError):
                    error = MigrationMismatchError if event.code == ErrorCode.MIGRATION else RemoteProtocolError
                    raise error(f"the peer refused the connection: {event.reason}")
                raise RemoteProtocolError(f"{type(event).__name__} before the handshake finished")
            events = link.receive()
    except (RemoteProtocolError, OSError):
        with contextlib.suppress(OSError):
            link.flush()  # an ERROR frame saying why, if the codec queued one
        link.close()
        raise


def _read_exactly(sock: socket.socket, want: int) -> bytes:
    data = b""
    while len(data) < want:
        chunk = sock.recv(want - len(data))
        if not chunk:
            raise RemoteProtocolError("the peer closed before its HELLO")
        data += chunk
    return data


def _read_hello(sock: socket.socket) -> bytes:
    """The first frame of a connecting peer, which must be a HELLO (of any
    protocol version: its length is read from its header)."""
    header = _read_exactly(sock, HEADER.size)
    kind, _, _, length = HEADER.unpack(header)
    if kind != FrameType.HELLO or length > MAX_PAYLOAD[FrameType.HELLO] or length < 12:
        raise RemoteProtocolError("the peer did not start with a umem HELLO")
    return header + _read_exactly(sock, length)


class Dialer:
    """Makes authenticated links for ``role``, by connecting or by listening."""

    def __init__(self, role: Role, key: bytes, migration_id: bytes, endpoint: Endpoint, *, listen: bool,
                 tls: TlsFiles | None = None, stop: threading.Event | None = None) -> None:
        self.role = role
        self.endpoint = endpoint
        self.listen = listen
        self.migration_id = migration_id
        self._key = key
        self._tls = tls.context(server_side=listen) if tls else None
        self._stop = stop or threading.Event()
        self._accepted: dict[Channel, queue.Queue[Link]] = {c: queue.Queue() for c in Channel}
        self._listener: socket.socket | None = None
        if listen:
            self._listener = socket.create_server((endpoint.host, endpoint.port), reuse_port=False)
            self._listener.settimeout(0.5)
            threading.Thread(target=self._accept_loop, name="umemd-accept", daemon=True).start()
            log.info("listening on %s", endpoint)

    def link(self, channel: Channel) -> Link:
        """A new link on ``channel``: waits (with backoff while connecting) until one is made.

        A peer of another migration is not retried: MigrationMismatchError.
        """
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            if self.listen:
                try:
                    return self._accepted[channel].get(timeout=0.5)
                except queue.Empty:
                    continue
            try:
                return self._connect(channel)
            except MigrationMismatchError:
                raise
            except (ConnectError, RemoteProtocolError) as e:
                log.warning("%s channel: %s; retrying in %.1f s", channel.name.lower(), e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        raise ConnectError(f"stopped before a {channel.name.lower()} link to {self.endpoint} was made")

    def _connect(self, channel: Channel) -> Link:
        try:
            sock = socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=HANDSHAKE_TIMEOUT)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock = self._tls.wrap_socket(sock, server_side=False)
        except OSError as e:
            raise ConnectError(f"cannot connect to {self.endpoint}: {e.strerror or e}") from e
        try:
            link = _handshake(sock, self.role, self._key, self.migration_id, str(self.endpoint), channel)
        except OSError as e:
            raise ConnectError(f"handshake with {self.endpoint} failed: {e.strerror or e}") from e
        log.info("%s channel connected to %s", channel.name.lower(), self.endpoint)
        return link

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer = f"{address[0]}:{address[1]}"
            threading.Thread(target=self._admit, args=(sock, peer), name="umemd-handshake", daemon=True).start()

    def _admit(self, sock: socket.socket, peer: str) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                sock = self._tls.wrap_socket(sock, server_side=True)
            link = _handshake(sock, self.role, self._key, self.migration_id, peer, None)
        except (RemoteProtocolError, OSError, ssl.SSLError) as e:
            log.warning("refused a connection from %s: %s", peer, e)
            sock.close()
            return
        log.info("%s channel accepted from %s", link.channel.name.lower(), peer)
        self._accepted[link.channel].put(link)

    def close(self) -> None:
        self._stop.set()
        if self._listener:
            self._listener.close()
