"""A KVM guest whose memory slot is a umem mapping: faults taken through
KVM's GUP (FAULT_FLAG_RETRY_NOWAIT first, then a blocking retry) are served
and the guest sees the filled bytes."""

from __future__ import annotations

import os
import select
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from umemd import Server, node_path
from umemd.protocol import PAGE_SIZE as PAGE

KVM_GUEST = Path(os.environ.get("UMEM_KVM_GUEST", Path(__file__).resolve().parents[2] / "build" / "kvm_guest"))

# Real mode, loaded at guest-physical 0 (page 0, itself served on demand).
GUEST_CODE = bytes([
    0xA0, 0x00, 0x10,        # mov al, [0x1000]   page 1
    0xE6, 0x10,              # out 0x10, al
    0x8A, 0x1E, 0x00, 0x20,  # mov bl, [0x2000]   page 2
    0x88, 0xD8,              # mov al, bl
    0xE6, 0x10,              # out 0x10, al
    0xF4,                    # hlt
])


def page_for(offset: int) -> bytes:
    contents = {0: GUEST_CODE, PAGE: b"\x42", 2 * PAGE: b"\x99"}.get(offset, b"")
    return contents.ljust(PAGE, contents[-1:] or b"\0")


@pytest.fixture(scope="module")
def kvm() -> None:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    module = "kvm_amd" if " svm" in cpuinfo else "kvm_intel"
    subprocess.run(["modprobe", module], check=True)
    assert Path("/dev/kvm").exists(), f"{module} loaded but /dev/kvm is missing"
    assert KVM_GUEST.exists(), f"{KVM_GUEST} not built: run make test-kernel"


def test_kvm_guest_reads_pages_served_on_demand(kvm: None, make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    requested: list[int] = []
    stop = threading.Event()
    poller = select.poll()
    poller.register(server.fileno(), select.POLLIN)

    def serve() -> None:
        while not stop.is_set():
            if not poller.poll(100):
                continue
            for fault in server.read_faults():
                requested.append(fault.offset)
                server.fill([(fault.offset, page_for(fault.offset))])

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    try:
        guest = subprocess.run([str(KVM_GUEST), str(node_path(server.name)), str(1 << 20)],
                               capture_output=True, text=True, timeout=300)
    finally:
        stop.set()
        server_thread.join(10)
    assert guest.returncode == 0, guest.stdout + guest.stderr
    assert guest.stdout.splitlines() == ["out 0x42", "out 0x99", "hlt"]
    assert {0, PAGE, 2 * PAGE} <= set(requested)
