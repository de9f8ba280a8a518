"""Races held open at the module's park points (tests/kernel/parking.py):
a server attaching while the last one is being released, and rmmod while
the code that drops an instance's last reference is still running."""

from __future__ import annotations

import ctypes
import mmap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness.kmod import load_module, unload_module
from tests.harness.mapping import MAP_FIXED, Mapping, libc, page_pattern
from tests.harness.waiting import wait_until
from umemd import Control, Fault, Server, node_path
from umemd.protocol import PAGE_SIZE as PAGE

from .parking import Park, parking
from .test_faults import waiters


@pytest.fixture
def park() -> Iterator[Park]:
    with parking() as p:
        yield p


def runs_in_kernel(thread: threading.Thread, function: str) -> bool:
    """Whether ``thread`` sleeps in the kernel with ``function`` on its stack."""
    stack = Path(f"/proc/self/task/{thread.native_id}/stack")
    try:
        return function in stack.read_text()
    except FileNotFoundError:
        return False


def test_a_server_attaching_during_the_release_of_the_last_gets_each_record_once(
    control: Control, make_instance: Callable[..., Server], park: Park
) -> None:
    """ATTACH waits until the leaving server's records are dropped: before,
    it could slip in between ``served = false`` and the queue reset, read a
    record the reset then dropped, and read it again when the waiter asked
    anew (two records for one missing page)."""
    first = make_instance(size=1 << 20)
    with Mapping(node_path(first.name), 1 << 20) as m:
        reader = m.reader(0)
        wait_until(lambda: waiters(first) == 1, what="the reader to wait for page 0")
        park.arm("server_release")
        closer = threading.Thread(target=first.close)
        closer.start()
        park.wait_parked("server_release")

        attached: list[Server] = []
        seen: list[Fault] = []

        def attach() -> None:
            server = control.attach(first.name, nonblock=True)
            seen.extend(server.read_faults())
            attached.append(server)

        attacher = threading.Thread(target=attach)
        attacher.start()
        wait_until(lambda: bool(attached) or runs_in_kernel(attacher, "umem_server_open"),
                   what="the new server to attach, or to wait in ATTACH")
        park.go()
        closer.join()
        attacher.join()
        with attached[0] as second:
            wait_until(lambda: second.stats().requested == 2, what="the reader to ask the new server")
            seen.extend(second.read_faults())
            second.fill([(0, page_pattern(0))])
            reader.join()
    assert seen == [Fault(0, write=False)], f"the new server read {seen} for one missing page"
    assert reader.data == page_pattern(0)


def map_anonymous_over(m: Mapping) -> None:
    """Replace ``m`` by anonymous memory, at once, under a fault sleeping in it."""
    addr = libc.mmap(m.addr, m.length, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED, -1, 0)
    assert addr == m.addr, f"mmap over the instance failed: errno {ctypes.get_errno()}"


def test_rmmod_is_refused_until_the_code_that_freed_the_last_instance_has_returned(park: Park) -> None:
    """The last reference of an instance can be a fault that slept: no file
    of ours is open any more when it wakes and frees the instance. Before,
    the module's count dropped to zero right there (module_put() from module
    code), and rmmod could unload the code the fault was returning through."""
    with Control() as control:
        server = control.create("lastref", 1 << 20)
        m = Mapping(node_path(server.name), 1 << 20)
        reader = m.reader(0)
        wait_until(lambda: waiters(server) == 1, what="the reader to wait for page 0")
        park.arm("fault_woken")
        server.close()  # the reader wakes to ask the next server, and is parked
        park.wait_parked("fault_woken")
        map_anonymous_over(m)
        control.destroy("lastref")
    park.arm("freed")
    park.go()
    park.wait_parked("freed")
    refused = unload_module()
    assert refused.returncode != 0 and "in use" in refused.stderr, (
        "rmmod unloaded umem while the task that freed the last instance still ran its code")
    park.go()
    reader.join()
    assert reader.data == bytes(PAGE), "the retried fault did not read the anonymous page"
    wait_until(lambda: unload_module().returncode == 0, what="rmmod to succeed once the task has returned")
    load_module()
