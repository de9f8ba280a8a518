"""Fixtures of the end-to-end suite (``make test-e2e``): the test VM as the
destination host, booted once for every test, and one event loop to drive it.

The source guest runs on the host with the patched QEMU; the destination
QEMU, umem.ko and ``umemd pull`` run inside the test VM (tests/harness/umem.py
and tests/harness/driver.py). Logs of every test stay in build/e2e/<test>/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import CHECKOUT
from tests.harness.driver import Driver, guest, settings, vm_driver

LOGS = CHECKOUT / "build" / "e2e"

__all__ = ["guest", "settings"]


@pytest.fixture(scope="session")
def vm() -> Iterator[Driver]:
    yield from vm_driver(LOGS / "vm")


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Path:
    """build/e2e/<test>: inside the checkout, so the VM sees it (the key file)."""
    path: Path = LOGS / str(request.node.name).replace("[", "-").replace("]", "")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path
