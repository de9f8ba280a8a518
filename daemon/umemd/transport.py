"""Sockets for the wire protocol: connect or listen, TLS, the handshake, liveness.

A :class:`Link` is one authenticated connection: a socket and its codec
(:class:`umemd.protocol.Connection`). A :class:`Dialer` makes links for one
role: it connects (retrying with backoff) or accepts on its listening
socket, whichever the user chose; either way each link's channel is the
one its first HELLO names.

Liveness: a link that has received nothing for ``peer_timeout`` seconds is
lost (TimeoutError, an OSError, from :meth:`Link.receive`,
:meth:`Link.poll` or :meth:`Link.check_alive`), and so is one whose sends
make no progress for as long (the socket timeout, TCP_USER_TIMEOUT). The
Dialer's keepalive thread sends KEEPALIVE on every link it made that has
sent nothing for a quarter of that, so a live peer is never silent. A newer
accepted link of a channel replaces the older one (shut down, so the
thread reading it moves on).

Before authentication a connection costs one handshake thread and a small
buffer: at most ``MAX_HANDSHAKES`` at once (more are closed at accept), one
deadline for the whole handshake TLS included, and an accept loop that
pauses on any error (EMFILE, a thread that cannot start) and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import select
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, cast

from umemd.errors import (
    AuthenticationError,
    ConnectError,
    LocalProtocolError,
    MigrationMismatchError,
    RemoteProtocolError,
    UmemError,
)
from umemd.protocol import (
    HEADER,
    LIVE,
    Authenticated,
    Channel,
    Connection,
    ErrorCode,
    Event,
    PeerError,
    Role,
    hello_channel,
    hello_length,
)

log = logging.getLogger(__name__)

PEER_TIMEOUT = 30.0  # default --peer-timeout: also the deadline of a whole handshake
MAX_HANDSHAKES = 8  # connections being authenticated at once, per listening daemon
ACCEPT_ERROR_PAUSE = 0.5  # seconds the accept loop waits after an error (EMFILE, ...)
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0

P = ParamSpec("P")
Frame = bytes | tuple[bytes | memoryview, ...]


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
    """TLS with the peer verified: by a CA and the name on its certificate, or pinned to one
    certificate (``peer_cert``, compared byte for byte)."""

    cert: Path
    key: Path
    ca: Path | None = None
    name: str | None = None  # the peer's name (the connecting side defaults to the host it connects to)
    peer_cert: Path | None = None

    def __post_init__(self) -> None:
        if (self.ca is None) == (self.peer_cert is None):
            raise UmemError("TLS needs the peer verified: give --tls-ca CA.pem (with --tls-name on the listening "
                            "side) or --tls-peer-cert PEER.pem (that one certificate), not both and not neither")

    def context(self, server_side: bool) -> ssl.SSLContext:
        purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
        ctx = ssl.create_default_context(purpose, cafile=self.ca or self.peer_cert)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.verify_mode = ssl.CERT_REQUIRED
        if self.peer_cert is not None:  # the pinned certificate is its own trust anchor, whoever signed it
            ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        ctx.check_hostname = False  # checked by check_peer, on both sides alike
        return ctx

    def check_peer(self, sock: ssl.SSLSocket, default_name: str | None) -> None:
        """Refuse a peer whose certificate is not the pinned one or does not carry the expected name."""
        der = sock.getpeercert(binary_form=True)
        if der is None:
            raise ssl.SSLError("the peer sent no certificate")
        if self.peer_cert is not None:
            pinned = ssl.PEM_cert_to_DER_cert(self.peer_cert.read_text())
            if hashlib.sha256(der).digest() != hashlib.sha256(pinned).digest():
                raise ssl.SSLError(f"the peer's certificate is not the one pinned by --tls-peer-cert {self.peer_cert}")
            return
        name = self.name or default_name
        if name is None:
            raise ssl.SSLError("no name to check the peer's certificate against: give --tls-name")
        names = _certificate_names(sock.getpeercert() or {})
        if name not in names:
            raise ssl.SSLError(f"the peer's certificate is for {', '.join(sorted(names)) or 'no name'}, "
                               f"not {name!r} (--tls-name)")


def _certificate_names(cert: ssl._PeerCertRetDictType) -> set[str]:
    """The DNS and IP subject alternative names of a verified certificate, or its common name without them."""
    alternatives = cast(tuple[tuple[str, str], ...], cert.get("subjectAltName", ()))
    names = {value for kind, value in alternatives if kind in ("DNS", "IP Address")}
    if names:
        return names
    subject = cast(tuple[tuple[tuple[str, str], ...], ...], cert.get("subject", ()))
    return {value for rdn in subject for key, value in rdn if key == "commonName"}


class Link:
    """One authenticated connection of a channel."""

    def __init__(self, sock: socket.socket, conn: Connection, peer: str,
                 peer_timeout: float = PEER_TIMEOUT) -> None:
        self.sock = sock
        self.conn = conn
        self.peer = peer
        self.channel = conn.channel
        self.peer_timeout = peer_timeout
        self.bytes_in = 0
        self.pending: list[Event] = []  # events that arrived with the handshake's last bytes
        self.last_received = self.last_sent = time.monotonic()
        self._send_lock = threading.Lock()  # frames from two threads (e.g. an abort) never interleave

    def send_frame(self, build: Callable[P, Frame], *args: P.args, **kwargs: P.kwargs) -> int:
        """Build a frame with the codec (``link.send_frame(link.conn.send_info, size)``) and send it,
        both under the send lock: frames leave in the order their MACs were made. Returns the bytes sent."""
        with self._send_lock:
            parts = _parts(build(*args, **kwargs))
            self._send(parts)
        return sum(len(p) for p in parts)

    def try_send_frame(self, wait: float, build: Callable[P, Frame], *args: P.args, **kwargs: P.kwargs) -> bool:
        """Like :meth:`send_frame` unless another thread's send holds the link for ``wait`` seconds
        (a peer that stopped reading); whether it was sent. For a last word or a keepalive."""
        acquired = self._send_lock.acquire(timeout=wait) if wait > 0 else self._send_lock.acquire(blocking=False)
        if not acquired:
            return False
        try:
            self._send(_parts(build(*args, **kwargs)))
            return True
        except (OSError, LocalProtocolError):
            return False
        finally:
            self._send_lock.release()

    def _send(self, parts: tuple[bytes | memoryview, ...]) -> None:
        if isinstance(self.sock, ssl.SSLSocket):  # no sendmsg over TLS
            for part in parts:
                self.sock.sendall(part)
        else:
            pending = [memoryview(p) for p in parts if len(p)]
            while pending:
                sent = self.sock.sendmsg(pending)
                while pending and sent >= len(pending[0]):
                    sent -= len(pending[0])
                    pending.pop(0)
                if pending and sent:
                    pending[0] = pending[0][sent:]
        self.last_sent = time.monotonic()

    def keep_alive(self, idle: float) -> None:
        """A KEEPALIVE if nothing was sent for ``idle`` seconds and no other send is under way."""
        if time.monotonic() - self.last_sent >= idle and self.conn.state in LIVE:
            self.try_send_frame(0, self.conn.send_keepalive)

    def flush(self) -> None:
        """Send what the codec queued (AUTH, an ERROR)."""
        with self._send_lock:
            data = self.conn.data_to_send()
            if data:
                self._send((data,))

    def receive(self) -> list[Event]:
        """Events already received, or else read once (blocking, at most the peer timeout) and
        return the events it completes; [Closed()] at end of file."""
        if self.pending:
            events, self.pending = self.pending, []
            return events
        try:
            n = self.sock.recv_into(self.conn.receive_buffer())
        except TimeoutError:
            raise self._silent() from None
        self.last_received = time.monotonic()
        self.bytes_in += n
        self.conn.received(n)
        events = []
        while (event := self.conn.next_event()) is not None:
            events.append(event)
        self.flush()
        return events

    def buffered(self) -> bool:
        """Whether something can be read without waiting: events, or TLS data the socket's
        readiness does not show."""
        return bool(self.pending) or (isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0)

    def poll(self, timeout: float = 0.0) -> list[Event]:
        """Like :meth:`receive`, but read only if data arrives within ``timeout``
        seconds (0: don't wait); [] if nothing did."""
        if self.buffered() or select.select([self.sock], [], [], max(timeout, 0.0))[0]:
            return self.receive()
        self.check_alive()
        return []

    def check_alive(self) -> None:
        """TimeoutError if nothing arrived for the peer timeout (for loops that wait in select)."""
        if time.monotonic() - self.last_received > self.peer_timeout:
            raise self._silent()

    def _silent(self) -> TimeoutError:
        return TimeoutError(f"no word from {self.peer} for {self.peer_timeout:g} s (--peer-timeout): "
                            "the peer or the network between us is gone")

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


def _parts(frame: Frame) -> tuple[bytes | memoryview, ...]:
    return (frame,) if isinstance(frame, bytes) else frame


def _set_liveness(sock: socket.socket, peer_timeout: float) -> None:
    """Sends that make no progress fail after the peer timeout too (unacknowledged data:
    TCP_USER_TIMEOUT; a full window: the socket timeout)."""
    sock.settimeout(peer_timeout)
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(peer_timeout * 1000))


class Deadline:
    """One deadline for a whole handshake: every wait gets what is left of it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self) -> float:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the handshake took longer than {self.seconds:g} s (--peer-timeout)")
        return left

    def arm(self, sock: socket.socket) -> None:
        sock.settimeout(self.left())


def _tls_handshake(sock: ssl.SSLSocket, deadline: Deadline) -> None:
    """The TLS handshake, non-blocking, within ``deadline`` (a peer sending one byte at a time included)."""
    sock.setblocking(False)
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            select.select([sock], [], [], deadline.left())
        except ssl.SSLWantWriteError:
            select.select([], [sock], [], deadline.left())


# What a peer's ERROR during the handshake raises: these two are not retried by a connecting side.
_REFUSALS: dict[int, type[RemoteProtocolError]] = {ErrorCode.MIGRATION: MigrationMismatchError,
                                                   ErrorCode.AUTH: AuthenticationError}


def _handshake(sock: socket.socket, role: Role, key: bytes, migration_id: bytes, peer: str,
               channel: Channel | None, deadline: Deadline, peer_timeout: float) -> Link:
    """Run the handshake on a fresh socket; ``channel`` None: the one the peer's HELLO names."""
    hello = b""
    if channel is None:
        hello = _read_hello(sock, deadline)
        named = hello_channel(hello)
        # An invalid channel still gets a codec, which then refuses that HELLO with the reason.
        channel = Channel(named) if named in {c.value for c in Channel} else Channel.DEMAND
    conn = Connection(role, channel, key, migration_id, frame_macs=not isinstance(sock, ssl.SSLSocket))
    link = Link(sock, conn, peer, peer_timeout)
    try:
        deadline.arm(sock)
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
                    _set_liveness(sock, peer_timeout)
                    link.pending = events[i + 1:]  # e.g. the source's INFO, in the same segment
                    return link
                if isinstance(event, PeerError):
                    error = _REFUSALS.get(event.code, RemoteProtocolError)
                    hint = " (the same --key-file on both hosts?)" if error is AuthenticationError else ""
                    raise error(f"the peer refused the connection: {event.reason}{hint}")
                raise RemoteProtocolError(f"{type(event).__name__} before the handshake finished")
            deadline.arm(sock)
            events = link.receive()
    except (RemoteProtocolError, OSError):
        with contextlib.suppress(OSError):
            link.flush()  # an ERROR frame saying why, if the codec queued one
        link.close()
        raise


def _read_exactly(sock: socket.socket, want: int, deadline: Deadline) -> bytes:
    data = b""
    while len(data) < want:
        deadline.arm(sock)
        chunk = sock.recv(want - len(data))
        if not chunk:
            raise RemoteProtocolError("the peer closed before its HELLO")
        data += chunk
    return data


def _read_hello(sock: socket.socket, deadline: Deadline) -> bytes:
    """The first frame of a connecting peer, which must be a HELLO (of any
    protocol version: its length is read from its header)."""
    header = _read_exactly(sock, HEADER.size, deadline)
    return header + _read_exactly(sock, hello_length(header), deadline)


class Dialer:
    """Makes authenticated links for ``role``, by connecting or by listening.

    Threads: the callers of :meth:`link` (one per channel), ``umemd-accept``
    and one ``umemd-handshake`` per connection being authenticated (listening
    only), ``umemd-keepalive``. ``_lock`` guards ``_waiting`` (the newest
    accepted link of each channel not handed out yet) and ``_current`` (the
    link of each channel handed out last).
    """

    def __init__(self, role: Role, key: bytes, migration_id: bytes, endpoint: Endpoint, *, listen: bool,
                 tls: TlsFiles | None = None, stop: threading.Event | None = None,
                 peer_timeout: float = PEER_TIMEOUT) -> None:
        self.role = role
        self.endpoint = endpoint
        self.listen = listen
        self.migration_id = migration_id
        self.peer_timeout = peer_timeout
        self._key = key
        self._tls_files = tls
        self._tls = tls.context(server_side=listen) if tls else None
        self._stop = stop or threading.Event()
        self._lock = threading.Condition()
        self._waiting: dict[Channel, Link | None] = dict.fromkeys(Channel)
        self._current: dict[Channel, Link | None] = dict.fromkeys(Channel)
        self._links: weakref.WeakSet[Link] = weakref.WeakSet()  # every link made, for the keepalives
        self._handshakes = threading.BoundedSemaphore(MAX_HANDSHAKES)
        self._listener: socket.socket | None = None
        if listen:
            family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
            self._listener = socket.create_server((endpoint.host, endpoint.port), family=family)
            self._listener.settimeout(0.5)
            threading.Thread(target=self._accept_loop, name="umemd-accept", daemon=True).start()
            log.info("listening on %s", endpoint)
        threading.Thread(target=self._keepalive_loop, name="umemd-keepalive", daemon=True).start()

    def link(self, channel: Channel) -> Link:
        """A new link on ``channel``: waits (with backoff while connecting) until one is made.

        A peer of another migration is not retried: MigrationMismatchError.
        """
        delay = BACKOFF_FIRST
        while not self._stop.is_set():
            if self.listen:
                with self._lock:
                    link = self._waiting[channel]
                    if link is None:
                        self._lock.wait(0.5)
                        continue
                    self._waiting[channel] = None
                    return self._hand_out(link)
            try:
                link = self._connect(channel)
            except (MigrationMismatchError, AuthenticationError):
                raise  # a stale daemon, or the wrong key: retrying cannot help
            except (ConnectError, RemoteProtocolError) as e:
                log.warning("%s channel: %s; retrying in %.1f s", channel.name.lower(), e, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            with self._lock:
                return self._hand_out(link)
        raise ConnectError(f"stopped before a {channel.name.lower()} link to {self.endpoint} was made")

    def _hand_out(self, link: Link) -> Link:
        """Caller holds ``_lock``."""
        self._current[link.channel] = link
        self._links.add(link)
        return link

    def _connect(self, channel: Channel) -> Link:
        deadline = Deadline(self.peer_timeout)
        try:
            sock = socket.create_connection((self.endpoint.host, self.endpoint.port), timeout=deadline.left())
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._with_tls(sock, deadline, self.endpoint.host)
        except (OSError, ssl.SSLError) as e:
            raise ConnectError(f"cannot connect to {self.endpoint}: {getattr(e, 'strerror', None) or e}") from e
        try:
            link = _handshake(sock, self.role, self._key, self.migration_id, str(self.endpoint), channel,
                              deadline, self.peer_timeout)
        except OSError as e:
            raise ConnectError(f"handshake with {self.endpoint} failed: {e.strerror or e}") from e
        log.info("%s channel connected to %s", channel.name.lower(), self.endpoint)
        return link

    def _with_tls(self, sock: socket.socket, deadline: Deadline, peer_name: str | None) -> socket.socket:
        """``sock`` inside TLS with the peer verified (``peer_name``: the name to expect unless
        --tls-name says), within ``deadline``; ``sock`` itself without TLS."""
        if not (self._tls and self._tls_files):
            return sock
        tls = self._tls.wrap_socket(sock, server_side=self.listen, do_handshake_on_connect=False)
        try:  # ``sock`` is detached now: closing it would leave the connection open
            _tls_handshake(tls, deadline)
            self._tls_files.check_peer(tls, peer_name)
        except BaseException:
            tls.close()
            raise
        return tls

    def _accept_loop(self) -> None:
        """Accept until stopped, whatever fails (EMFILE, a thread that cannot start): a real
        source must always be able to connect again."""
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as e:
                if self._stop.is_set() or self._listener.fileno() < 0:
                    return
                log.warning("accepting a connection on %s failed: %s; trying again in %g s", self.endpoint,
                            e.strerror or e, ACCEPT_ERROR_PAUSE)
                self._stop.wait(ACCEPT_ERROR_PAUSE)
                continue
            peer = f"{address[0]}:{address[1]}"
            if not self._handshakes.acquire(blocking=False):
                log.warning("refused a connection from %s: %d handshakes already under way", peer, MAX_HANDSHAKES)
                sock.close()
                continue
            try:
                threading.Thread(target=self._admit, args=(sock, peer), name="umemd-handshake", daemon=True).start()
            except RuntimeError as e:
                log.warning("refused a connection from %s: cannot start its handshake thread: %s", peer, e)
                self._handshakes.release()
                sock.close()
                self._stop.wait(ACCEPT_ERROR_PAUSE)

    def _admit(self, sock: socket.socket, peer: str) -> None:
        try:
            link = self._authenticate(sock, peer)
        finally:
            self._handshakes.release()
        if link is None:
            return
        log.info("%s channel accepted from %s", link.channel.name.lower(), peer)
        with self._lock:
            unclaimed, current = self._waiting[link.channel], self._current[link.channel]
            self._waiting[link.channel] = link
            self._lock.notify_all()
        # A newer connection of this migration: the peer is back or restarted, and the older
        # link may be half-open. Its reader sees end of file and takes this one.
        for old in (unclaimed, current):
            if old is not None and old.sock.fileno() >= 0:
                log.info("%s channel: the connection from %s replaces the one from %s",
                         link.channel.name.lower(), peer, old.peer)
                old.shutdown()
        if unclaimed is not None:
            unclaimed.close()

    def _authenticate(self, sock: socket.socket, peer: str) -> Link | None:
        deadline = Deadline(self.peer_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock = self._with_tls(sock, deadline, None)
            return _handshake(sock, self.role, self._key, self.migration_id, peer, None, deadline,
                              self.peer_timeout)
        except (RemoteProtocolError, OSError, ssl.SSLError) as e:
            log.warning("refused a connection from %s: %s", peer, e)
            sock.close()
            return None

    def _keepalive_loop(self) -> None:
        idle = self.peer_timeout / 4
        while not self._stop.wait(idle / 2):
            for link in list(self._links):
                link.keep_alive(idle)

    def close(self) -> None:
        self._stop.set()
        if self._listener:
            self._listener.close()
