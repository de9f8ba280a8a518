"""Instance pages are ordinary shmem pages: GUP, kernel-context faults and
smaps all see a shared shmem mapping."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.mapping import Mapping, libc, page_pattern
from tests.harness.waiting import task_state, wait_until
from umemd import Fault, Server, node_path
from umemd.protocol import PAGE_SIZE as PAGE

MADV_HUGEPAGE = 14


class IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def serve_one_fault(server: Server, offset: int, data: bytes, *, write: bool = False) -> None:
    faults = server.read_faults()
    server.fill([(offset, data)])  # first, so a failed check leaves no thread blocked
    assert faults == [Fault(offset, write=write)]


def test_process_vm_readv_faults_the_page_in(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        buf = ctypes.create_string_buffer(PAGE)
        local = IoVec(ctypes.addressof(buf), PAGE)
        remote = IoVec(m.addr + 4 * PAGE, PAGE)
        result: list[int] = []
        t = threading.Thread(
            target=lambda: result.append(libc.process_vm_readv(os.getpid(), ctypes.byref(local), 1,
                                                               ctypes.byref(remote), 1, 0)))
        t.start()
        serve_one_fault(server, 4 * PAGE, page_pattern(4))
        t.join(10)
        assert result == [PAGE]
        assert buf.raw == page_pattern(4)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[str]:
    backing = tmp_path / "disk"
    backing.write_bytes(bytes(1 << 20))
    subprocess.run(["modprobe", "loop"], check=True)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True)


def test_o_direct_write_from_the_mapping(make_instance: Callable[..., Server], loop_device: str) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        fd = os.open(loop_device, os.O_RDWR | os.O_DIRECT)
        try:
            source = (ctypes.c_char * (2 * PAGE)).from_address(m.addr + 8 * PAGE)
            result: list[int] = []
            t = threading.Thread(target=lambda: result.append(os.pwrite(fd, source, 0)))
            t.start()
            for _ in range(2):
                fault = server.read_faults(max_records=1)[0]
                server.fill([(fault.offset, page_pattern(fault.offset // PAGE))])
            t.join(10)
            assert result == [2 * PAGE]
        finally:
            os.close(fd)
    with open(loop_device, "rb") as disk:
        assert disk.read(2 * PAGE) == page_pattern(8) + page_pattern(9)


def test_kernel_context_fault_from_a_pipe_read(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, b"from the pipe")
        with Mapping(node_path(server.name), 1 << 20) as m:
            target = (ctypes.c_char * PAGE).from_address(m.addr + 6 * PAGE)
            result: list[int] = []
            t = threading.Thread(target=lambda: result.append(os.readv(rfd, [target])))
            t.start()
            serve_one_fault(server, 6 * PAGE, page_pattern(6), write=True)
            t.join(10)
            assert result == [13]
            assert m.read(6 * PAGE, PAGE) == b"from the pipe" + page_pattern(6)[13:]
    finally:
        os.close(rfd)
        os.close(wfd)


def signal_pending(tid: int, signo: int) -> bool:
    """Whether ``signo`` is pending for thread ``tid`` itself (SigPnd, not ShdPnd)."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("SigPnd:"):
            return bool(int(line.split()[1], 16) >> (signo - 1) & 1)
    raise AssertionError(f"no SigPnd line for thread {tid}")


def test_a_kernel_mode_fault_with_a_signal_pending_sleeps(make_instance: Callable[..., Server]) -> None:
    """write(2) from a missing page faults in kernel mode: a non-fatal signal
    cannot be delivered until the syscall returns, so the wait must not end on
    it (it would only be retried at once, for ever: a busy loop)."""
    server = make_instance(size=1 << 20)
    rfd, wfd = os.pipe()
    handled: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signo, frame: handled.append(signo))
    try:
        with Mapping(node_path(server.name), 1 << 20) as m:
            source = (ctypes.c_char * PAGE).from_address(m.addr + 6 * PAGE)
            result: list[int] = []
            writer = threading.Thread(target=lambda: result.append(os.write(wfd, source)), daemon=True)
            writer.start()
            wait_until(lambda: server.stats().waiters == 1, what="the write(2) to wait for its page")
            assert writer.native_id is not None and writer.ident is not None
            tid = writer.native_id
            signal.pthread_kill(writer.ident, signal.SIGUSR1)
            assert signal_pending(tid, signal.SIGUSR1)
            # Asleep (killable: "D"), or round the wait again: the busy loop.
            wait_until(lambda: task_state(tid) == "D" or server.stats().faults > 1,
                       what="the writer to sleep or to wait again")
            faults, state = server.stats().faults, task_state(tid)
            assert faults == 1, f"the write(2) went round its wait {faults} times with SIGUSR1 pending ({state})"
            assert state == "D"
            assert signal_pending(tid, signal.SIGUSR1)
            server.fill([(6 * PAGE, page_pattern(6))])
            writer.join(10)
            assert result == [PAGE]
            assert os.read(rfd, PAGE) == page_pattern(6)
            wait_until(lambda: handled == [signal.SIGUSR1], what="the signal to be delivered")
        assert server.stats().faults == 1
    finally:
        server.zero(6 * PAGE, PAGE)  # a failed test's writer returns, and takes its signal, here
        writer.join(10)
        signal.signal(signal.SIGUSR1, previous)
        os.close(rfd)
        os.close(wfd)


def smaps_entry(addr: int) -> list[str]:
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"{addr:x}-"):
            entry = [line]
            for rest in lines[i + 1:]:
                if rest[0] in "0123456789abcdef" and "-" in rest.split()[0]:
                    break
                entry.append(rest)
            return entry
    raise AssertionError(f"no smaps entry at {addr:#x}")


def test_smaps_shows_a_shared_shmem_mapping_of_small_pages(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=4 << 20)
    server.zero(0, 4 << 20)
    with Mapping(node_path(server.name), 4 << 20) as m:
        assert libc.madvise(ctypes.c_void_p(m.addr), 4 << 20, MADV_HUGEPAGE) == 0  # as QEMU does
        m.write(0, b"x" * (4 << 20))
        entry = smaps_entry(m.addr)
    fields = dict(line.split(":", 1) for line in entry[1:])
    assert f"umem:{server.name}" in entry[0]
    assert "sh" in fields["VmFlags"].split()
    assert int(fields["Rss"].split()[0]) == 4096
    assert int(fields["ShmemPmdMapped"].split()[0]) == 0
