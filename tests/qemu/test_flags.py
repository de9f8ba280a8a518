"""``-postcopy``, ``postcopy-device=on`` and ``-global migration.x-ignore-shared``.

No real umem device exists on the host. A character device that is accepted
is tested with /dev/zero: ``postcopy-device`` only checks that mem-path is an
existing character device (stat), never which driver backs it. QEMU then maps
/dev/zero shared (its ``ftruncate`` warning is expected: /dev/zero reports
size 0). The real device is exercised inside the test VM.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.harness.machine import run_qemu

CAPS = ['{"execute": "query-migrate-capabilities", "id": "caps"}']


def backend(mem_path: str | Path, **props: str) -> list[str]:
    opts = ",".join([f"memory-backend-file,id=ram0,size=64M,mem-path={mem_path}",
                     *(f"{k.replace('_', '-')}={v}" for k, v in props.items())])
    return ["-m", "64M", "-object", opts, "-machine", "memory-backend=ram0"]


def ignore_shared(output: str) -> bool:
    for line in output.splitlines():
        if '"id": "caps"' in line:
            caps = {c["capability"]: c["state"] for c in json.loads(line)["return"]}
            return bool(caps["x-ignore-shared"])
    raise AssertionError(f"no query-migrate-capabilities answer in:\n{output}")


def fails_with(args: list[str], *needles: str) -> None:
    run = run_qemu(*args)
    assert run.returncode == 1, run.output
    for needle in needles:
        assert needle in run.output, f"{needle!r} not in:\n{run.output}"


# --- the capability -----------------------------------------------------------

def test_ignore_shared_off_by_default() -> None:
    run = run_qemu("-m", "64M", qmp_commands=CAPS)
    assert run.returncode == 0, run.output
    assert not ignore_shared(run.output)


def test_global_sets_ignore_shared() -> None:
    run = run_qemu("-m", "64M", "-global", "migration.x-ignore-shared=on", qmp_commands=CAPS)
    assert run.returncode == 0, run.output
    assert ignore_shared(run.output)


def test_postcopy_sets_ignore_shared_on_a_source(tmp_path: Path) -> None:
    run = run_qemu("-postcopy", *backend(tmp_path / "ram", share="on"), qmp_commands=CAPS)
    assert run.returncode == 0, run.output
    assert ignore_shared(run.output)


def test_postcopy_sets_ignore_shared_on_a_destination() -> None:
    run = run_qemu("-postcopy", "-incoming", "defer",
                   *backend("/dev/zero", share="on", postcopy_device="on"), qmp_commands=CAPS)
    assert run.returncode == 0, run.output
    assert ignore_shared(run.output)


def test_ignore_shared_still_refuses_postcopy_ram() -> None:
    fails_with(["-m", "64M", "-global", "migration.x-ignore-shared=on", "-global", "migration.x-postcopy-ram=on"],
               "Postcopy is not compatible with ignore-shared")


# --- postcopy-device=on on memory-backend-file ------------------------------------

def test_device_accepts_a_character_device() -> None:
    run = run_qemu("-incoming", "defer", *backend("/dev/zero", share="on", postcopy_device="on"))
    assert run.returncode == 0, run.output


def test_device_missing_node(tmp_path: Path) -> None:
    node = tmp_path / "umem-vm0"
    fails_with(["-incoming", "defer", *backend(node, share="on", postcopy_device="on")],
               f"mem-path '{node}' does not exist", "create the post-copy device first")
    assert not node.exists(), "QEMU created a file for a missing post-copy device"


def test_device_regular_file(tmp_path: Path) -> None:
    node = tmp_path / "ram"
    node.write_bytes(b"")
    fails_with(["-incoming", "defer", *backend(node, share="on", postcopy_device="on")],
               f"mem-path '{node}' is not a character device")


def test_device_directory(tmp_path: Path) -> None:
    fails_with(["-incoming", "defer", *backend(tmp_path, share="on", postcopy_device="on")],
               "is not a character device")


@pytest.mark.parametrize("share", ["off", None])
def test_device_needs_share(share: str | None) -> None:
    props = {"postcopy_device": "on"} | ({"share": share} if share else {})
    fails_with(["-incoming", "defer", *backend("/dev/zero", **props)], "postcopy-device=on requires share=on")


def test_device_refuses_prealloc() -> None:
    fails_with(["-incoming", "defer", *backend("/dev/zero", share="on", prealloc="on", postcopy_device="on")],
               "incompatible with prealloc=on", "drop it")


def test_device_refuses_mem_prealloc() -> None:
    fails_with(["-mem-prealloc", "-incoming", "defer", *backend("/dev/zero", share="on", postcopy_device="on")],
               "incompatible with prealloc=on")


def test_device_refuses_discard_data() -> None:
    fails_with(["-incoming", "defer", *backend("/dev/zero", share="on", discard_data="on", postcopy_device="on")],
               "incompatible with discard-data=on")


def test_device_disables_ram_discard() -> None:
    # virtio-mem needs to discard RAM; the post-copy backend forbids it.
    fails_with(["-incoming", "defer", *backend("/dev/zero", share="on", postcopy_device="on"),
                "-object", "memory-backend-ram,id=vmem0,size=128M",
                "-m", "64M,maxmem=256M", "-device", "virtio-mem-pci,id=vm0,memdev=vmem0"],
               "Discarding RAM is disabled")


def test_device_off_keeps_the_old_behaviour(tmp_path: Path) -> None:
    # Without the property QEMU still creates a regular file: the trap it closes.
    node = tmp_path / "created"
    run = run_qemu("-incoming", "defer", *backend(node, share="on"))
    assert run.returncode == 0, run.output
    assert node.is_file()


# --- -postcopy's checks of every RAM backend -----------------------------------------

def test_postcopy_destination_needs_the_property(tmp_path: Path) -> None:
    fails_with(["-postcopy", "-incoming", "defer", *backend(tmp_path / "ram", share="on")],
               "-postcopy with -incoming: memory backend 'ram0' needs postcopy-device=on")


def test_postcopy_destination_refuses_default_ram() -> None:
    fails_with(["-postcopy", "-incoming", "defer", "-m", "64M"],
               "memory backend 'pc.ram' is a memory-backend-ram; use memory-backend-file")


def test_postcopy_destination_checks_every_backend() -> None:
    fails_with(["-postcopy", "-incoming", "defer", *backend("/dev/zero", share="on", postcopy_device="on"),
                "-object", "memory-backend-ram,id=extra,size=16M"],
               "memory backend 'extra' is a memory-backend-ram")


def test_postcopy_source_needs_share(tmp_path: Path) -> None:
    fails_with(["-postcopy", *backend(tmp_path / "ram", share="off")],
               "-postcopy: memory backend 'ram0' needs share=on")


def test_postcopy_source_refuses_default_ram() -> None:
    fails_with(["-postcopy", "-m", "64M"], "memory backend 'pc.ram' is a memory-backend-ram")
