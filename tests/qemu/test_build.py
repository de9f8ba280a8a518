"""The series are well formed, applied, and built into the chosen QEMU with their flags.

qemu-patches/ holds the default series (QEMU 10.2.x), qemu-patches/10.0/ the
one for 10.0.x; ``UMEM_QEMU_SERIES`` picks the build (docs/qemu.md).

The build itself runs in ``make qemu`` (qemu-patches/build.sh, which fails
loudly if a patch does not apply); these tests check what it produced.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.harness import CHECKOUT
from tests.harness.machine import CACHE, qemu_datadir

PATCHES = CHECKOUT / "qemu-patches"
BUILD_SH = PATCHES / "build.sh"
SERIES_DIRS = [PATCHES, *sorted(d for d in PATCHES.iterdir() if (d / "series").is_file())]


def qemu_binary_default() -> Path:
    return CACHE / "qemu" / "current" / "bin" / "qemu-system-x86_64"


def series_prefix() -> str:
    """The QEMU release the build is of: UMEM_QEMU_SERIES, else build.sh's default."""
    default = re.search(r"UMEM_QEMU_SERIES:-([\d.]+)", BUILD_SH.read_text())
    assert default, "no UMEM_QEMU_SERIES default in build.sh"
    return os.environ.get("UMEM_QEMU_SERIES") or default[1]


def built_series_dir() -> Path:
    return PATCHES / series_prefix() if (PATCHES / series_prefix() / "series").is_file() else PATCHES


def series(directory: Path) -> list[str]:
    lines = (directory / "series").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("directory", SERIES_DIRS, ids=lambda d: d.name)
def test_series_lists_every_patch(directory: Path) -> None:
    on_disk = sorted(p.name for p in directory.glob("[0-9][0-9][0-9][0-9]-*.patch") if not p.name.startswith("0000"))
    assert series(directory) == on_disk
    assert (directory / sorted(directory.glob("0000-*.patch"))[0]).exists()


@pytest.mark.parametrize("path", [d / name for d in SERIES_DIRS for name in series(d)],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_patch_is_fit_for_qemu_devel(path: Path) -> None:
    text = path.read_text()
    head, _, diff = text.partition("\n---\n")
    subject = re.search(r"^Subject: \[PATCH \d+/\d+\] (.*)$", head, re.M)
    assert subject, "no Subject"
    assert re.match(r"^[\w/.-]+(, [\w/.-]+)*: \S", subject[1]), f"subject not 'subsystem: summary': {subject[1]}"
    body = head.split("\n\n", 1)[1]
    assert "Signed-off-by: " in body
    long_lines = [line for line in body.splitlines() if len(line) > 76]
    assert not long_lines, f"body lines over 76 columns: {long_lines}"
    assert "diff --git" in diff


def test_binary_is_patched_release(qemu: Path) -> None:
    out = subprocess.run([str(qemu), "--version"], check=True, capture_output=True, text=True).stdout
    assert re.search(rf"QEMU emulator version {re.escape(series_prefix())}\.\d+", out), out
    info = (qemu.resolve().parent.parent / "BUILD-INFO").read_text()
    for name in series(built_series_dir()):
        assert name in info, f"BUILD-INFO does not list {name}"


def test_binary_has_the_flags(qemu: Path) -> None:
    help_text = subprocess.run([str(qemu), "-help"], check=True, capture_output=True, text=True).stdout
    assert re.search(r"^-postcopy\b", help_text, re.M)
    props = subprocess.run([str(qemu), "-object", "memory-backend-file,help"], check=True,
                           capture_output=True, text=True).stdout
    assert "postcopy-device=<bool>" in props


def test_firmware_is_installed() -> None:
    for name in ("bios-256k.bin", "efi-virtio.rom", "kvmvapic.bin", "linuxboot_dma.bin"):
        assert (qemu_datadir() / name).exists(), name


def test_binary_is_built_from_this_series(qemu: Path) -> None:
    """`current` must be the build of the series in this checkout (make qemu was rerun)."""
    if os.environ.get("UMEM_QEMU") and Path(os.environ["UMEM_QEMU"]).resolve() != qemu_binary_default().resolve():
        pytest.skip("UMEM_QEMU names a binary outside the cache")
    key = subprocess.run(["bash", str(BUILD_SH), "--key"], check=True, capture_output=True,
                         text=True).stdout.strip()
    info = (qemu.resolve().parent.parent / "BUILD-INFO").read_text()
    assert f"key={key}\n" in info, f"the binary is not the build of this series ({key}): run `make qemu`"
