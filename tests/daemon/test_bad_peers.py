"""Bad peers: a wrong key, malformed and fuzzed input on live sockets. Each
bad connection is closed with a logged reason; the daemon keeps serving
and the migration still completes."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.harness.waiting import wait_until
from umemd.protocol import HEADER, MAGIC, PAGE_SIZE, VERSION, FrameType, frame

from .conftest import SOURCE_SIZE, Migration
from .test_pull import finish


def send_raw(port: int, data: bytes) -> bytes:
    """Send ``data`` to the daemon, return what it answered before closing."""
    reply = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass  # closed on us with our bytes unread: a refusal too
    return reply


def hello(migration: Migration, version: int = VERSION, role: int = 1, channel: int = 1,
          migration_id: bytes | None = None) -> bytes:
    """A source's HELLO for ``migration`` (or for another one)."""
    ours = bytes.fromhex(migration.migration_id)
    return frame(FrameType.HELLO, struct.pack("!8sHBBI16s16s", MAGIC, version, role, channel, 0, bytes(16),
                                              migration_id or ours))


def v1_hello() -> bytes:
    return frame(FrameType.HELLO, struct.pack("!8sHBBI16s", MAGIC, 1, 1, 1, 0, bytes(16)))


def test_a_wrong_key_gets_no_page(migration: Migration, tmp_path: Path) -> None:
    pull = migration.pull()
    wrong = tmp_path / "wrong-key"
    wrong.write_text("ab" * 32 + "\n")
    wrong.chmod(0o600)
    impostor = migration.serve(key=wrong)
    impostor.expect_exit(1)  # the wrong key: it gives up, it does not retry for ever
    assert "authentication failed" in pull.text() and "the same --key-file on both hosts" in impostor.text()
    assert migration.present() == 0
    guest = migration.guest("sequential", threads=2, touches=50)
    migration.serve()
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE


def test_malformed_connections_are_closed_and_logged(migration: Migration) -> None:
    pull = migration.pull()
    cases = {
        b"GET / HTTP/1.0\r\n\r\n" * 3: "did not start with a umem HELLO",
        hello(migration, version=9): "protocol version 9",
        v1_hello(): f"the peer speaks umem protocol version 1, this umemd speaks {VERSION}",
        hello(migration, role=2): "expected a source",
        hello(migration, migration_id=b"\xee" * 16): f"belongs to migration {'ee' * 16}",
        hello(migration) + HEADER.pack(FrameType.PAGES, 0, 0, 1 << 30): "exceeds its limit",
        hello(migration) + HEADER.pack(FrameType.PAGES, 0, 0, 16) + bytes(16): "PAGES is not allowed",
        hello(migration)[:20]: "closed before its HELLO",
    }
    for data, reason in cases.items():
        send_raw(migration.port, data)
        wait_until(lambda reason=reason: reason in pull.text(), 60, f"the log to say {reason!r}")
    assert pull.proc.poll() is None and migration.present() == 0
    guest = migration.guest("random", threads=2, touches=50)
    migration.serve()
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE


def test_fuzzed_connections_never_stop_the_daemons(migration: Migration) -> None:
    pull = migration.pull()

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.one_of(st.binary(max_size=256), st.binary(max_size=64).map(lambda tail: hello(migration) + tail)))
    def fuzz(data: bytes) -> None:
        send_raw(migration.port, data)
        assert pull.proc.poll() is None

    fuzz()
    assert migration.present() == 0
    guest = migration.guest("strided", threads=2, touches=50)
    migration.serve()
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE


def test_a_serve_of_another_size_exits_1_naming_it(migration: Migration, tmp_path: Path) -> None:
    pull = migration.pull()
    small = tmp_path / "another-guests-ram"
    small.write_bytes(b"\x11" * (16 * PAGE_SIZE))
    other = migration.serve(source=small)
    other.expect_exit(1)  # no retry can fix a size: it said so and stopped (it retried for ever before)
    assert f"not {16 * PAGE_SIZE} bytes, the size of {small}" in other.text(), other.text()
    assert "point umemd serve at this guest's RAM file" in pull.text()
    assert pull.proc.poll() is None and migration.present() == 0
