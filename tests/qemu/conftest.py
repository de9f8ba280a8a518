"""Fixtures: the patched QEMU built by ``make qemu`` and the test guest image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.driver import guest
from tests.harness.machine import qemu_binary

__all__ = ["guest"]


@pytest.fixture(scope="session")
def qemu() -> Path:
    path = qemu_binary()
    if not path.exists():
        pytest.fail(f"{path} does not exist: run `make qemu` (qemu-patches/build.sh) first")
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    # QMP socket paths must stay short (108 bytes): pytest's tmp_path does.
    yield tmp_path
