"""Lifetime: killable waits, the server leaving and coming back, DESTROY
with pages missing, and the module pinned by its instances."""

from __future__ import annotations

import errno
import mmap
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import CHECKOUT
from tests.harness.kmod import load_module, unload_module
from tests.harness.mapping import Mapping, page_pattern
from tests.harness.waiting import wait_until
from umemd import Control, DeviceError, Fault, Server, node_path
from umemd.protocol import PAGE_SIZE as PAGE

from .test_faults import waiters

# A process that maps an instance, reads the pages named on stdin one per
# line and prints each page's first 32 bytes.
TOUCHER = """
import sys
sys.path.insert(0, {checkout!r})
from tests.harness.mapping import Mapping
from umemd.protocol import PAGE_SIZE as PAGE
m = Mapping({path!r}, {size})
print("mapped", flush=True)
for line in sys.stdin:
    page = int(line)
    print(m.read(page * PAGE, 32).decode(errors="replace"), flush=True)
"""


def start_toucher(server: Server) -> subprocess.Popen[str]:
    script = TOUCHER.format(checkout=str(CHECKOUT), path=str(node_path(server.name)), size=server.size)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "mapped\n"
    return proc


def touch(proc: subprocess.Popen[str], page: int) -> None:
    assert proc.stdin is not None
    proc.stdin.write(f"{page}\n")
    proc.stdin.flush()


def test_a_waiter_killed_dies_promptly(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    proc = start_toucher(server)
    touch(proc, 3)
    wait_until(lambda: waiters(server) == 1, what="the toucher to wait")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: waiters(server) == 0, what="the wait to end")


def test_mmap_works_while_another_thread_waits_for_a_page(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        reader = m.reader(0)
        wait_until(lambda: waiters(server) == 1, what="the reader to wait")
        elapsed: list[float] = []

        def map_and_unmap() -> None:
            start = time.monotonic()
            for _ in range(10):
                Mapping(node_path(server.name), PAGE).close()
            elapsed.append(time.monotonic() - start)

        worker = threading.Thread(target=map_and_unmap, daemon=True)
        worker.start()
        worker.join(10)
        # mmap_lock is not held while the reader sleeps: the worker finished
        # while the page is still missing.
        assert elapsed and reader.is_alive(), "mmap blocked behind a sleeping fault"
        server.fill([(0, page_pattern(0))])
        reader.join(10)
        assert reader.data == page_pattern(0)


def test_pending_faults_are_read_again_after_attach(control: Control, make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        read_once = m.reader(2 * PAGE)
        assert server.read_faults() == [Fault(2 * PAGE, write=False)]
        never_read = m.reader(7 * PAGE)
        wait_until(lambda: waiters(server) == 2, what="two waiters")
        server.close()  # the daemon dies: one fault read, one still queued

        with control.attach(server.name, nonblock=True) as again:
            # 2 requests to the first server, then one more from each waiter
            wait_until(lambda: again.stats().requested == 4, what="both waiters to ask again")
            offsets = sorted(f.offset for f in again.read_faults())
            assert offsets == [2 * PAGE, 7 * PAGE]
            again.fill([(2 * PAGE, page_pattern(2)), (7 * PAGE, page_pattern(7))])
            read_once.join(10)
            never_read.join(10)
            assert read_once.data == page_pattern(2)
            assert never_read.data == page_pattern(7)


def test_destroy_with_pages_missing_raises_sigbus(control: Control, make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    server.fill([(0, page_pattern(0))])
    sleeper, later = start_toucher(server), start_toucher(server)
    touch(sleeper, 5)
    wait_until(lambda: waiters(server) == 1, what="the sleeper to wait")

    control.destroy(server.name)
    assert not node_path(server.name).exists()
    assert sleeper.wait(timeout=10) == -signal.SIGBUS

    touch(later, 0)  # present pages stay readable until unmapped
    assert later.stdout is not None
    assert later.stdout.readline().strip() == page_pattern(0)[:32].decode()
    touch(later, 6)  # a later fault on a missing page
    assert later.wait(timeout=10) == -signal.SIGBUS
    server.close()


# A process that maps an instance, touches page 0 (present), and dumps core
# with only shared anonymous memory (the shmem of the instance) in the dump.
DUMPER = """
import os, resource, sys
sys.path.insert(0, {checkout!r})
from tests.harness.mapping import Mapping
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
with open("/proc/self/coredump_filter", "w") as f:
    f.write("0x2")
m = Mapping({path!r}, {size})
m.read(0, 1)
os.abort()
"""


@pytest.fixture
def core_dir(tmp_path: Path) -> Iterator[Path]:
    """Core dumps go to ``tmp_path`` while the test runs."""
    pattern = Path("/proc/sys/kernel/core_pattern")
    previous = pattern.read_text()
    pattern.write_text(f"{tmp_path}/core.%p")
    try:
        yield tmp_path
    finally:
        pattern.write_text(previous)


def test_a_core_dump_does_not_fetch_missing_pages(make_instance: Callable[..., Server], core_dir: Path) -> None:
    """A crashing QEMU dumps what is present; a missing page is a hole in the
    core (SIGBUS to the dumper's fault), never a request to the server."""
    server = make_instance(size=1 << 20)
    server.fill([(0, page_pattern(0))])
    script = DUMPER.format(checkout=str(CHECKOUT), path=str(node_path(server.name)), size=server.size)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(lambda: proc.poll() is not None or server.stats().requested > 0, timeout=60,
                   what="the dumper to exit or to ask for a page")
        requested = server.stats().requested
        assert requested == 0, f"the core dump asked the server for {requested} missing pages"
        assert proc.wait(timeout=10) == -signal.SIGABRT
    finally:
        proc.kill()
        proc.wait()
    (core,) = core_dir.glob("core.*")
    image = core.read_bytes()
    assert page_pattern(0) in image
    assert server.stats().faults == 0


def test_module_is_pinned_by_an_instance_without_any_fd() -> None:
    with Control() as control:
        control.create("pin", 1 << 20).close()
    try:
        refused = unload_module()
        assert refused.returncode != 0 and "in use" in refused.stderr
    finally:
        with Control() as control:
            control.destroy("pin")
    assert unload_module().returncode == 0
    load_module()



def test_after_destroy_the_server_sees_end_of_file_and_fills_fail(
    control: Control, make_instance: Callable[..., Server]
) -> None:
    server = make_instance(size=1 << 20)
    node = os.open(node_path(server.name), os.O_RDWR)
    try:
        control.destroy(server.name)
        poller = select.poll()
        poller.register(server.fileno(), select.POLLIN)
        assert poller.poll(0) == [(server.fileno(), select.POLLHUP)]
        assert server.read_faults() == [] and server.destroyed
        for call in (lambda: server.fill([(0, page_pattern(0))]), lambda: server.zero(0, PAGE)):
            with pytest.raises(DeviceError) as info:
                call()
            assert info.value.errno == errno.ENODEV
        with pytest.raises(OSError) as mapped:
            mmap.mmap(node, PAGE, mmap.MAP_SHARED)
        assert mapped.value.errno == errno.ENODEV
    finally:
        os.close(node)


def test_a_read_only_shared_mapping_reads_filled_pages(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    server.fill([(0, page_pattern(0))])
    fd = os.open(node_path(server.name), os.O_RDONLY)
    try:
        with mmap.mmap(fd, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ) as m:
            assert m[:PAGE] == page_pattern(0)
    finally:
        os.close(fd)
