"""Fixtures of the kernel suite.

The suite needs umem.ko loaded, so it runs inside the test VM
(`make test-kernel`). On a host without the module every test is skipped
with the reason; inside the VM (UMEM_IN_VM=1) a skip fails the run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.cgroups import Cgroup, memory_cgroups
from tests.harness.kmod import IN_VM, load_module
from umemd import Control, DeviceError, InstanceNotFoundError, Server
from umemd.device import CONTROL_PATH


@pytest.fixture(scope="session", autouse=True)
def umem_module() -> None:
    if not IN_VM and not CONTROL_PATH.exists():
        pytest.skip("umem.ko is not loaded here: the kernel suite runs inside the test VM (make test-kernel)")
    load_module()


@pytest.fixture
def control() -> Iterator[Control]:
    with Control() as ctl:
        yield ctl


@pytest.fixture
def cgroups() -> Iterator[Callable[[str], Cgroup]]:
    with memory_cgroups() as make:
        yield make


_names = itertools.count()


@pytest.fixture
def make_instance(control: Control) -> Iterator[Callable[..., Server]]:
    """Create instances that are destroyed after the test."""
    made: list[Server] = []

    def make(size: int = 1 << 20, *, nonblock: bool = False, name: str | None = None, **options: Any) -> Server:
        server = control.create(name or f"t{os.getpid()}-{next(_names)}", size, nonblock=nonblock, **options)
        made.append(server)
        return server

    yield make
    for server in made:
        with contextlib.suppress(DeviceError):
            server.zero(0, server.size)  # release any thread a failed test left waiting
        server.close()
        with contextlib.suppress(InstanceNotFoundError):
            control.destroy(server.name)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    skipped = terminalreporter.stats.get("skipped", [])
    if IN_VM and skipped:
        terminalreporter.write_line(f"FAILED: {len(skipped)} kernel tests skipped inside the VM", red=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if IN_VM and reporter is not None and reporter.stats.get("skipped"):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
