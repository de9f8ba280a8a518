"""Fixtures of the end-to-end suite (``make test-e2e``): the test VM as the
destination host, booted once for every test, and one event loop to drive it.

The source guest runs on the host with the patched QEMU; the destination
QEMU, umem.ko and ``umemd pull`` run inside the test VM (bench/umem.py has
the topology). Logs of every test stay in build/e2e/<test>/.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from bench.modes import Settings
from bench.topology import VmTopology
from bench.umem import PORTS
from tests.qemu.harness import CHECKOUT, GuestImage, guest_image, qemu_binary

T = TypeVar("T")
LOGS = CHECKOUT / "build" / "e2e"


class Driver:
    """Runs coroutines on the one loop the topology's connections live on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, topo: VmTopology) -> None:
        self.loop = loop
        self.topo = topo

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)


@pytest.fixture(scope="session")
def guest() -> GuestImage:
    if not qemu_binary().exists():
        pytest.fail(f"{qemu_binary()} does not exist: run `make qemu` first")
    return guest_image()


@pytest.fixture(scope="session")
def vm() -> Iterator[Driver]:
    yield from vm_driver(LOGS / "vm")


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


@pytest.fixture
def settings() -> Settings:
    """A small guest: 256 MiB of RAM, 64 MiB of it the workload's from the start and 64 MiB more that it
    takes while it runs (never-touched memory written up to the switch-over), one pass after the last page."""
    return Settings(ram="256M", mib=64, grow_mib=64, passes_after=1, boot_timeout=120, verify_timeout=300)


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Path:
    """build/e2e/<test>: inside the checkout, so the VM sees it (the key file)."""
    path: Path = LOGS / str(request.node.name).replace("[", "-").replace("]", "")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
