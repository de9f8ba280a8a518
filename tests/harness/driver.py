"""A pytest session driving the end-to-end topology (tests/e2e, tests/chaos): the test VM as the
destination host, booted once for the session, the one event loop its connections live on, and
the test guest."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.harness.machine import GuestImage, Settings, guest_image, qemu_binary
from tests.harness.topology import VmTopology
from tests.harness.umem import PORTS

T = TypeVar("T")


class Driver:
    """Runs coroutines on the one loop the topology's connections live on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, topo: VmTopology) -> None:
        self.loop = loop
        self.topo = topo

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    """The test guest, built or taken from the cache; the patched QEMU must be built."""
    if not qemu_binary().exists():
        pytest.fail(f"{qemu_binary()} does not exist: run `make qemu` (qemu-patches/build.sh) first")
    return guest_image()


@pytest.fixture
def settings() -> Settings:
    """The e2e guest: 256 MiB of RAM, 64 MiB of it the workload's from the start and 64 MiB more that it
    takes while it runs (never-touched memory written up to the switch-over), one pass after the last page."""
    return Settings(ram="256M", mib=64, grow_mib=64, passes_after=1, boot_timeout=120, verify_timeout=300)


def vm_driver(logs: Path) -> Iterator[Driver]:
    """The test VM booted with the umem forwards, its logs in ``logs``, until the generator closes."""
    loop = asyncio.new_event_loop()
    topo = VmTopology(logs, PORTS, timeout=3000)
    loop.run_until_complete(topo.start())
    try:
        yield Driver(loop, topo)
    finally:
        loop.run_until_complete(topo.stop())
        loop.close()
