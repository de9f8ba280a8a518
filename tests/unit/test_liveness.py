"""Links that must not hang: a silent peer, a slow-loris before authentication,
a listener out of file descriptors, a newer connection of the same migration,
and TLS peers that are not who they should be. Every deadline is asserted as a
multiple of the configured peer timeout."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.harness.net import free_port
from umemd.errors import ConnectError, RemoteProtocolError
from umemd.protocol import PAGE_SIZE, Authenticated, Channel, Connection, Info, Role
from umemd.transport import Dialer, Endpoint, TlsFiles

KEY = bytes(range(32))
MIGRATION = bytes(16)
TIMEOUT = 1.0  # the peer timeout of these tests; each deadline is a multiple of it


def source_handshake(port: int, channel: Channel = Channel.DEMAND, timeout: float = 10) -> tuple[socket.socket,
                                                                                                 Connection]:
    """Connect as a source and finish the handshake with the codec; returns the socket and codec."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    conn = Connection(Role.SOURCE, channel, KEY, MIGRATION)
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError("closed during the handshake")
        conn.receive_data(data)
        events = []
        while (event := conn.next_event()) is not None:
            events.append(event)
        sock.sendall(conn.data_to_send())  # our AUTH, once the destination's HELLO is in
        if any(isinstance(e, Authenticated) for e in events):
            return sock, conn


def test_a_silent_peer_is_lost_within_three_peer_timeouts() -> None:
    port = free_port()
    dialer = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True,
                    peer_timeout=TIMEOUT)
    try:
        sock, _ = source_handshake(port)  # then never a byte more (a stopped or vanished host)
        link = dialer.link(Channel.DEMAND)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no word from"):
            while True:
                link.receive()
        assert time.monotonic() - started < 3 * TIMEOUT
        sock.close()
    finally:
        dialer.close()


def test_a_live_idle_peer_gets_keepalives_and_is_never_lost() -> None:
    timeout = 4 * TIMEOUT  # keepalives every timeout/4: room for a loaded machine's scheduling
    port = free_port()
    listener = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True,
                      peer_timeout=timeout)
    connector = Dialer(Role.SOURCE, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=False, peer_timeout=timeout)
    try:
        ours = connector.link(Channel.DEMAND)
        theirs = listener.link(Channel.DEMAND)
        before = theirs.bytes_in
        while theirs.bytes_in - before < 3 * 24:  # three keepalives (header and MAC) arrived, nothing lost
            assert theirs.poll(timeout) == []
        ours.send_frame(ours.conn.send_info, 16 * PAGE_SIZE)
        assert theirs.receive() == [Info(16 * PAGE_SIZE)]
    finally:
        connector.close()
        listener.close()


def test_a_slow_loris_is_dropped_by_the_handshake_deadline_and_a_real_source_gets_in() -> None:
    port = free_port()
    dialer = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True,
                    peer_timeout=TIMEOUT)
    try:
        loris = socket.create_connection(("127.0.0.1", port))
        hello = Connection(Role.SOURCE, Channel.DEMAND, KEY, MIGRATION).data_to_send()
        started = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in hello * 100:  # one byte at a time, each well within the timeout
                loris.send(bytes([byte]))
                time.sleep(TIMEOUT / 10)
                if time.monotonic() - started > 3 * TIMEOUT:
                    pytest.fail("a slow-loris peer stays connected past the handshake deadline")
        loris.close()
        source_handshake(port)[0].close()
        dialer.link(Channel.DEMAND).close()
    finally:
        dialer.close()


LISTENER = """
import logging, resource, sys, time
logging.basicConfig(level=logging.WARNING)
from umemd.protocol import Channel, Role
from umemd.transport import Dialer, Endpoint
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
import os
opened = len(os.listdir("/proc/self/fd"))
resource.setrlimit(resource.RLIMIT_NOFILE, (opened + 3, hard))  # the listener and two more
dialer = Dialer(Role.DESTINATION, bytes(range(32)), bytes(16), Endpoint("127.0.0.1", int(sys.argv[1])),
                listen=True, peer_timeout=float(sys.argv[2]))
print("listening", flush=True)
link = dialer.link(Channel.DEMAND)
print("linked", flush=True)
"""


def test_the_accept_loop_survives_running_out_of_file_descriptors() -> None:
    port = free_port()
    listener = subprocess.Popen([sys.executable, "-c", LISTENER, str(port), str(TIMEOUT)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    try:
        assert listener.stdout is not None and listener.stdout.readline() == "listening\n"
        hogs = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]  # beyond its fds: EMFILE
        with contextlib.suppress(OSError):  # while they hold its fds, the listener can only fail to accept
            source_handshake(port, timeout=3 * TIMEOUT)[0].close()
        for hog in hogs:
            hog.close()
        deadline = time.monotonic() + 10 * TIMEOUT
        while True:  # a real source retries, as umemd serve does
            try:
                source_handshake(port, timeout=3 * TIMEOUT)[0].close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the listener never took a real source after EMFILE"
                time.sleep(TIMEOUT / 10)
        assert listener.stdout.readline() == "linked\n"
    finally:
        listener.kill()
        _, err = listener.communicate()
    assert "Too many open files" in err, err


def test_a_newer_connection_of_the_migration_replaces_the_older() -> None:
    """A restarted serve's links must not wait behind the half-open links of the old one."""
    port = free_port()
    dialer = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True,
                    peer_timeout=60)
    try:
        old_sock, _ = source_handshake(port)
        old = dialer.link(Channel.DEMAND)
        new_sock, new_conn = source_handshake(port)
        assert old.receive()[-1].__class__.__name__ == "Closed", "the older link was not shut down"
        new = dialer.link(Channel.DEMAND)
        new_sock.sendall(new_conn.send_info(16 * PAGE_SIZE))
        assert new.receive() == [Info(16 * PAGE_SIZE)]
        old_sock.close()
        new_sock.close()
    finally:
        dialer.close()


# ---- TLS: the peer is verified ----------------------------------------------------------


def make_cert(directory: Path, name: str, ca: tuple[Path, Path] | None = None) -> tuple[Path, Path]:
    directory = directory / f"{name}-by-{ca[0].parent.name if ca else 'itself'}"
    directory.mkdir()
    cert, key = directory / "cert.pem", directory / "key.pem"
    if ca is None:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                        "-addext", "basicConstraints=critical,CA:TRUE", "-days", "1", "-keyout", str(key),
                        "-out", str(cert)], check=True, capture_output=True)
        return cert, key
    csr = directory / f"{name}.csr"
    subprocess.run(["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    ext = directory / f"{name}.ext"
    ext.write_text(f"subjectAltName=DNS:{name}\n")
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("pki")
    ca = make_cert(d, "umem-ca")
    other_ca = make_cert(d, "other-ca")
    return {"ca": ca, "other-ca": other_ca, "dst": make_cert(d, "dst.example", ca),
            "src": make_cert(d, "src.example", ca), "intruder": make_cert(d, "intruder.example", ca),
            "stranger": make_cert(d, "src.example", other_ca)}


def tls_pair(pki: dict[str, tuple[Path, Path]], source: str, *, listen: TlsFiles | None = None,
             connect: TlsFiles | None = None) -> bool:
    """Whether a source with certificate ``source`` gets a link to a listening destination."""
    port = free_port()
    listen = listen or TlsFiles(*pki["dst"], ca=pki["ca"][0], name="src.example")
    connect = connect or TlsFiles(*pki[source], ca=pki["ca"][0], name="dst.example")
    listener = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True, tls=listen,
                      peer_timeout=TIMEOUT)
    stop = threading.Event()
    connector = Dialer(Role.SOURCE, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=False, tls=connect,
                       stop=stop, peer_timeout=TIMEOUT)
    got: list[object] = []

    def accept() -> None:
        with contextlib.suppress(ConnectError):
            got.append(listener.link(Channel.DEMAND))

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    with contextlib.suppress(ConnectError, RemoteProtocolError):
        connector._connect(Channel.DEMAND)
    thread.join(3 * TIMEOUT)
    stop.set()
    listener.close()
    connector.close()
    return bool(got)


def test_tls_takes_a_peer_of_the_ca_with_the_expected_name(pki: dict[str, tuple[Path, Path]]) -> None:
    assert tls_pair(pki, "src")


def test_tls_refuses_a_peer_of_the_ca_with_another_name(pki: dict[str, tuple[Path, Path]]) -> None:
    assert not tls_pair(pki, "intruder"), "a certificate of the CA for another name was accepted"


def test_tls_refuses_a_peer_with_the_right_name_from_another_ca(pki: dict[str, tuple[Path, Path]]) -> None:
    assert not tls_pair(pki, "stranger")


def test_tls_pinned_to_one_certificate(pki: dict[str, tuple[Path, Path]]) -> None:
    pinned = TlsFiles(*pki["dst"], peer_cert=pki["src"][0])
    assert tls_pair(pki, "src", listen=pinned)
    assert not tls_pair(pki, "intruder", listen=pinned), "a certificate other than the pinned one was accepted"


def test_tls_without_a_way_to_verify_the_peer_is_refused_naming_the_fix(pki: dict[str, tuple[Path, Path]]) -> None:
    with pytest.raises(Exception, match=r"--tls-ca .* or --tls-peer-cert"):
        TlsFiles(*pki["src"])


def test_a_small_frame_behind_a_large_one_is_read_without_more_traffic(pki: dict[str, tuple[Path, Path]]) -> None:
    """TLS hands out records: a frame left in TLS's buffer must be read without waiting for the socket."""
    port = free_port()
    listener = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True,
                      tls=TlsFiles(*pki["dst"], ca=pki["ca"][0], name="src.example"), peer_timeout=30)
    connector = Dialer(Role.SOURCE, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=False,
                       tls=TlsFiles(*pki["src"], ca=pki["ca"][0], name="dst.example"), peer_timeout=30)
    try:
        src = connector.link(Channel.DEMAND)
        dst = listener.link(Channel.DEMAND)
        assert isinstance(dst.sock, ssl.SSLSocket)
        src.send_frame(src.conn.send_info, 64 * PAGE_SIZE)
        src.send_frame(src.conn.send_released)
        src.send_frame(src.conn.send_pages, 0, memoryview(os.urandom(16 * PAGE_SIZE)))
        src.send_frame(src.conn.send_zero, 32 * PAGE_SIZE, 1)
        seen: list[str] = []
        while "Zero" not in seen:
            before = dst.bytes_in
            events = dst.poll(30)
            assert events or dst.bytes_in > before, f"stuck after {seen} with data in TLS's buffer"
            seen += [type(e).__name__ for e in events]
    finally:
        connector.close()
        listener.close()


IF_INET6 = Path("/proc/net/if_inet6")


@pytest.mark.skipif(not socket.has_ipv6 or not IF_INET6.exists() or not IF_INET6.read_text().strip(),
                    reason="no IPv6 on this host")
def test_an_ipv6_listener_takes_a_source() -> None:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    listener = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint.parse(f"[::1]:{port}"), listen=True,
                      peer_timeout=30)
    connector = Dialer(Role.SOURCE, KEY, MIGRATION, Endpoint.parse(f"[::1]:{port}"), listen=False, peer_timeout=30)
    try:
        connector.link(Channel.PUSH)
        assert listener.link(Channel.PUSH).channel is Channel.PUSH
    finally:
        connector.close()
        listener.close()


def test_a_peer_that_never_starts_tls_is_dropped_by_the_handshake_deadline(pki: dict[str, tuple[Path, Path]]) -> None:
    port = free_port()
    listener = Dialer(Role.DESTINATION, KEY, MIGRATION, Endpoint("127.0.0.1", port), listen=True,
                      tls=TlsFiles(*pki["dst"], ca=pki["ca"][0], name="src.example"), peer_timeout=TIMEOUT)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10 * TIMEOUT) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b"", "the TLS listener sent something to a peer that said nothing"
            assert time.monotonic() - started < 3 * TIMEOUT, "a silent peer held a TLS handshake past its deadline"
    finally:
        listener.close()
