"""Migrations across a real link: a veth pair into a network namespace the
test creates (pyroute2), shaped with tbf + netem, and cut for a while."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pyroute2 import IPRoute, NetNS

from tests.harness.net import LinkPair, veth_namespace
from umemd.protocol import PAGE_SIZE

from .conftest import SOURCE_SIZE, Migration
from .test_pull import finish, started_but_unfinished

HERE, THERE = "10.77.0.1", "10.77.0.2"


@pytest.fixture
def source_host() -> Iterator[LinkPair]:
    """A namespace for the source, reached from here over a veth pair."""
    for module in ("sch_netem", "sch_tbf"):
        subprocess.run(["modprobe", module], check=True)
    with veth_namespace(f"umemsrc{os.getpid()}", "umv0", "umv1", HERE, THERE) as link:
        yield link


def shape(link: LinkPair) -> str:
    """1 Gbit/s with 1 ms of delay, both ways; returns `tc qdisc show` of our side."""
    with IPRoute() as ipr:
        ipr.tc("add", "tbf", index=link.index, handle="1:", rate="1gbit", burst=1 << 20, latency=50000)
        ipr.tc("add", "netem", index=link.index, parent="1:1", handle="10:", delay=1000)
    with NetNS(link.netns) as ns:
        ns.tc("add", "netem", index=ns.link_lookup(ifname=link.peer)[0], delay=1000)
    return subprocess.run(["tc", "qdisc", "show", "dev", link.ifname], capture_output=True, text=True).stdout


def rx_packets(link: LinkPair) -> int:
    return int(Path(f"/sys/class/net/{link.ifname}/statistics/rx_packets").read_text())


def test_migration_over_a_shaped_link(migration: Migration, source_host: LinkPair) -> None:
    qdiscs = shape(source_host)
    assert "tbf" in qdiscs and "netem" in qdiscs and "delay 1ms" in qdiscs
    migration.pull(listen=f"{HERE}:{migration.port}")
    guest = migration.guest("strided", threads=4, touches=100)
    migration.serve(connect=f"{HERE}:{migration.port}", netns=source_host.netns)
    report = finish(migration, guest)
    assert report["present"] == SOURCE_SIZE // PAGE_SIZE and report["faults"] > 0


def test_link_cut_and_restored(migration: Migration, source_host: LinkPair) -> None:
    migration.pull(listen=f"{HERE}:{migration.port}")
    guest = migration.guest("random", threads=2, touches=100)
    migration.serve("--max-push-rate", "16", connect=f"{HERE}:{migration.port}", netns=source_host.netns)
    started_but_unfinished(migration)
    source_host.set_state("down")
    # What is already in the socket buffers may still be filled (how much depends on how far the
    # pull lags, i.e. on load): the property is that nothing more crosses the link while it is down.
    crossed = rx_packets(source_host)
    time.sleep(3)  # the cut lasts a while; no count depends on how long
    assert rx_packets(source_host) == crossed, "packets crossed a link that was down"
    source_host.set_state("up")
    report = finish(migration, guest)
    assert report["present"] == SOURCE_SIZE // PAGE_SIZE
