"""Fixtures: the patched QEMU built by ``make qemu`` and the test guest image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import GuestImage, guest_image, qemu_binary


@pytest.fixture(scope="session")
def qemu() -> Path:
    path = qemu_binary()
    if not path.exists():
        pytest.fail(f"{path} does not exist: run `make qemu` (qemu-patches/build.sh) first")
    return path


@pytest.fixture(scope="session")
def guest(qemu: Path) -> GuestImage:
    return guest_image()


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    # QMP socket paths must stay short (108 bytes): pytest's tmp_path does.
    yield tmp_path
