"""The pull's status endpoint and what umemd migrate makes of it, over loopback."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import threading
import time
from typing import Any

import pytest

from umemd import cli
from umemd.errors import MigrationError
from umemd.migrate import QmpAddress, wait_release
from umemd.report import interval_series
from umemd.status import MAX_CLIENTS, StatusServer, read_status
from umemd.transport import Endpoint


def free_endpoint() -> Endpoint:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return Endpoint("127.0.0.1", s.getsockname()[1])


def test_a_client_follows_the_status_to_the_last_line() -> None:
    endpoint = free_endpoint()
    counter = itertools.count()
    server = StatusServer(endpoint, lambda: {"state": "pulling", "present": next(counter)})
    server.start()
    seen: list[dict[str, Any]] = []

    async def follow() -> dict[str, Any]:
        reader = asyncio.create_task(read_status(endpoint, seen.append, deadline=time.monotonic() + 20))
        while len(seen) < 3:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(server.finish, {"state": "complete", "present": 100})
        return await reader

    last = asyncio.run(follow())
    assert last == {"state": "complete", "present": 100}
    assert [s["state"] for s in seen[:3]] == ["pulling"] * 3
    presents = [s["present"] for s in seen[:-1]]
    assert presents == sorted(presents)


def test_the_follower_survives_a_restarted_daemon() -> None:
    endpoint = free_endpoint()
    first = StatusServer(endpoint, lambda: {"state": "pulling", "present": 1})
    first.start()
    seen: list[dict[str, Any]] = []

    async def follow() -> dict[str, Any]:
        reader = asyncio.create_task(read_status(endpoint, seen.append, deadline=time.monotonic() + 20))
        while not seen:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(first.finish, {"state": "pulling", "present": 2})  # killed mid-way
        second = StatusServer(endpoint, lambda: {"state": "pulling", "present": 3})
        second.start()
        while seen[-1]["present"] != 3:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(second.finish, {"state": "complete", "present": 4})
        return await reader

    assert asyncio.run(follow())["present"] == 4


def test_interval_latency_comes_from_the_difference_of_histograms() -> None:
    samples = [
        {"t": 0.0, "faults": 0, "latency": {}},
        {"t": 1.0, "faults": 10, "latency": {"<1024us": 10}},
        {"t": 2.0, "faults": 30, "latency": {"<1024us": 10, "<8192us": 20}},
    ]
    rates, p50, p99 = interval_series(samples)
    assert rates == [10.0, 20.0]
    assert p50 == [1024.0, 8192.0] and p99 == [1024.0, 8192.0]


def test_qmp_addresses_are_paths_or_host_and_port() -> None:
    assert QmpAddress("/run/vm1.qmp").target() == "/run/vm1.qmp"
    assert QmpAddress("dest:4449").target() == ("dest", 4449)
    assert QmpAddress("[::1]:4449").target() == ("::1", 4449)


def test_migrate_waits_for_a_page_server_and_says_when_none_came(caplog: pytest.LogCaptureFixture) -> None:
    endpoint = free_endpoint()
    server = StatusServer(endpoint, lambda: {"state": "ready", "name": "vm1", "node": "/dev/umem/vm1"})
    server.start()
    try:
        status = cli.main(["migrate", "--src-qmp", "/nonexistent.qmp", "--dst-qmp", "127.0.0.1:9",
                           "--dst-status", str(endpoint), "--uri", "tcp:127.0.0.1:9", "--ready-timeout", "2"])
    finally:
        server.finish({"state": "failed"})
    assert status == cli.EXIT_FAILED
    assert "is still 'ready'" in caplog.text and "no page server is connected" in caplog.text
    assert "umemd serve" in caplog.text


def test_no_line_follows_the_last_even_from_a_snapshot_under_way() -> None:
    """The broadcast thread may be inside a snapshot when the pull sends its last line: that
    snapshot must not reach a client after it."""
    endpoint = free_endpoint()
    inside, release = threading.Event(), threading.Event()
    calls = itertools.count()

    def slow_snapshot() -> dict[str, Any]:
        if next(calls):  # the first returns at once; the second is under way when the pull finishes
            inside.set()
            release.wait(30)
        return {"state": "pulling"}

    server = StatusServer(endpoint, slow_snapshot)
    with socket.create_connection((endpoint.host, endpoint.port), timeout=30) as client:
        server.start()
        inside.wait(30)  # the client was accepted before the first snapshot; the second has begun
        finisher = threading.Thread(target=server.finish, args=({"state": "complete"},))
        finisher.start()
        while not server._final:  # the last line is out
            time.sleep(0.01)
        release.set()
        finisher.join(30)
        lines = client.makefile().read().splitlines()
    assert lines and json.loads(lines[-1]) == {"state": "complete"}, lines


def test_clients_beyond_the_limit_are_refused() -> None:
    endpoint = free_endpoint()
    server = StatusServer(endpoint, lambda: {"state": "pulling"})
    server.start()
    clients = [socket.create_connection((endpoint.host, endpoint.port), timeout=30)
               for _ in range(MAX_CLIENTS + 4)]
    try:
        got = 0
        for c in clients:
            with contextlib.suppress(ConnectionResetError):
                got += bool(c.recv(1))
        assert got == MAX_CLIENTS
    finally:
        server.finish({"state": "complete"})
        for c in clients:
            c.close()


def test_the_wait_for_the_release_ends_when_the_pull_ends_aborted() -> None:
    endpoint = free_endpoint()
    server = StatusServer(endpoint, lambda: {"state": "pulling", "source_released": False})
    server.start()

    async def wait() -> None:
        waiting = asyncio.create_task(wait_release(endpoint, 600))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.finish, {"state": "aborted", "source_released": False})
        await asyncio.wait_for(waiting, 30)  # at once, not after the release timeout

    with pytest.raises(MigrationError, match="ended 'aborted' before the page server released"):
        asyncio.run(wait())


def test_the_wait_for_the_release_returns_once_released() -> None:
    endpoint = free_endpoint()
    server = StatusServer(endpoint, lambda: {"state": "pulling", "source_released": True})
    server.start()
    try:
        asyncio.run(wait_release(endpoint, 30))
    finally:
        server.finish({"state": "complete", "source_released": True})


def test_a_client_after_the_last_line_is_told_the_pull_has_ended(caplog: pytest.LogCaptureFixture) -> None:
    """The refusal names its reason: the last line is out, not the client limit."""
    endpoint = free_endpoint()
    server = StatusServer(endpoint, lambda: {"state": "pulling"})
    server.start()
    server._broadcast({"state": "complete"}, final=True)  # the last line, before finish() closes the listener
    try:
        with caplog.at_level("WARNING", logger="umemd.status"), \
                socket.create_connection((endpoint.host, endpoint.port), timeout=30) as client, \
                contextlib.suppress(ConnectionResetError):
            assert client.recv(1) == b""
        assert "the pull has ended" in caplog.text and "clients already" not in caplog.text, caplog.text
    finally:
        server.finish({"state": "complete"})
