"""Nothing hangs: a page server that stops answering is noticed within the
peer timeout, a pull without a source gives up after its source timeout and
leaves the instance to a restarted pull, and a pull whose instance is
destroyed under it exits naming the device error. Every deadline is a
multiple of a configured timeout."""

from __future__ import annotations

import asyncio
import signal
import time

from tests.harness.net import free_port
from tests.harness.waiting import wait_until
from umemd import Control, node_path
from umemd.protocol import PAGE_SIZE
from umemd.status import first_status
from umemd.transport import Endpoint

from .conftest import SOURCE_SIZE, Migration
from .test_pull import finish, started_but_unfinished

PEER_TIMEOUT = 5.0  # seconds: generous for a loaded TCG guest, keepalives flow every 1.25 s


def test_a_stopped_page_server_is_noticed_within_the_peer_timeout(migration: Migration) -> None:
    status = free_port()
    pull = migration.pull("--peer-timeout", str(PEER_TIMEOUT), "--status", f"127.0.0.1:{status}")
    guest = migration.guest("random", threads=2, touches=100)
    stopped = migration.serve("--max-push-rate", "16", "--peer-timeout", str(PEER_TIMEOUT))
    started_but_unfinished(migration)
    stopped.proc.send_signal(signal.SIGSTOP)  # alive to TCP (the kernel still acknowledges), silent to us
    wait_until(lambda: pull.text().count("no word from") >= 2, 3 * PEER_TIMEOUT,
               "the pull to notice on both channels")
    lost = asyncio.run(first_status(Endpoint("127.0.0.1", status), 30))["source_lost_since"]
    assert isinstance(lost, float) and lost <= time.time(), lost
    stopped.kill()
    migration.serve()
    assert finish(migration, guest)["present"] == SOURCE_SIZE // PAGE_SIZE


def test_a_pull_without_a_source_exits_4_and_a_restarted_pull_completes_the_guest(migration: Migration) -> None:
    source_timeout = 4 * PEER_TIMEOUT  # the first serve, started after the pull, must connect within it
    args = ("--peer-timeout", str(PEER_TIMEOUT), "--source-timeout", str(source_timeout))
    first = migration.pull(*args)
    guest = migration.guest("random", threads=2, touches=100)
    gone = migration.serve("--max-push-rate", "16")
    started_but_unfinished(migration)
    gone.kill()
    first.expect_exit(4, timeout=3 * (PEER_TIMEOUT + source_timeout))
    assert "no page server for" in first.text() and "it attaches" in first.text()
    assert node_path(migration.name).exists(), "the instance must stay for a restarted pull"
    migration.pull(*args)
    migration.serve()
    report = finish(migration, guest)
    assert report["attached"] is True and report["present"] == SOURCE_SIZE // PAGE_SIZE


def test_a_pull_whose_instance_is_destroyed_exits_naming_the_device_error(migration: Migration) -> None:
    pull = migration.pull()
    migration.serve("--max-push-rate", "16")
    started_but_unfinished(migration)
    with Control() as control:
        control.destroy(migration.name)
    pull.expect_exit(1, timeout=3 * PEER_TIMEOUT)  # it kept going on a destroyed instance before
    assert "ENODEV" in pull.text().splitlines()[-1], pull.text()[-2000:]
