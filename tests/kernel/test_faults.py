"""The fault protocol: a touch of a missing page blocks until it is filled."""

from __future__ import annotations

import ctypes
import errno
import mmap
import select
import threading
from collections.abc import Callable

import pytest

from tests.harness.mapping import Mapping, libc, page_pattern
from tests.harness.waiting import wait_until
from umemd import DeviceError, Fault, Server, node_path
from umemd.protocol import PAGE_SIZE as PAGE

from .userfault import Userfault


def waiters(server: Server) -> int:
    return server.stats().waiters


def test_fault_blocks_until_filled_then_reads_the_filled_bytes(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        reader = m.reader(3 * PAGE)
        assert server.read_faults() == [Fault(3 * PAGE, write=False)]
        wait_until(lambda: waiters(server) == 1, what="the reader to wait")
        assert reader.is_alive() and reader.data is None
        assert server.fill([(3 * PAGE, page_pattern(3))]) == (1, 0)
        reader.join(10)
        assert reader.data == page_pattern(3)
        assert m.read(3 * PAGE, PAGE) == page_pattern(3)
    stats = server.stats()
    assert (stats.present, stats.filled, stats.faults, stats.waiters) == (1, 1, 1, 0)
    assert stats.wait_ns > 0


def test_sixteen_threads_on_one_page_make_one_request(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    with Mapping(node_path(server.name), 1 << 20) as m:
        readers = [m.reader(5 * PAGE) for _ in range(16)]
        wait_until(lambda: waiters(server) == 16, what="16 waiters")
        assert server.read_faults() == [Fault(5 * PAGE, write=False)]
        assert server.read_faults() == []
        assert server.stats().requested == 1
        server.fill([(5 * PAGE, page_pattern(5))])
        for r in readers:
            r.join(10)
            assert r.data == page_pattern(5)
    assert server.stats().faults == 16


def test_distinct_pages_are_each_reported_once(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    pages = [0, 1, 7, 100, 255]
    with Mapping(node_path(server.name), 1 << 20) as m:
        readers = [m.reader(p * PAGE) for p in pages for _ in range(2)]
        wait_until(lambda: waiters(server) == len(readers), what="every reader to wait")
        offsets = [f.offset for f in server.read_faults(max_records=64)]
        assert sorted(offsets) == [p * PAGE for p in pages]
        server.fill([(p * PAGE, page_pattern(p)) for p in pages])
        for r in readers:
            r.join(10)
            assert r.data == page_pattern(r.offset // PAGE)
        assert server.read_faults() == []


def test_a_write_fault_is_flagged_and_lands_after_the_fill(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        writer = threading.Thread(target=m.write, args=(2 * PAGE + 10, b"guest"), daemon=True)
        writer.start()
        assert server.read_faults() == [Fault(2 * PAGE, write=True)]
        server.fill([(2 * PAGE, page_pattern(2))])
        writer.join(10)
        expected = bytearray(page_pattern(2))
        expected[10:15] = b"guest"
        assert m.read(2 * PAGE, PAGE) == expected


def test_filling_a_page_the_guest_wrote_leaves_the_guests_bytes(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    with Mapping(node_path(server.name), 1 << 20) as m:
        server.fill([(0, page_pattern(0))])
        m.write(100, b"written by the guest")
        late = server.fill([(0, page_pattern(0, seed=1)), (PAGE, page_pattern(1, seed=1))])
        assert late == (1, 1)
        assert m.read(100, 20) == b"written by the guest"
        assert m.read(PAGE, PAGE) == page_pattern(1, seed=1)
    assert server.stats().skipped == 1


def test_one_fill_call_takes_many_ranges_and_long_runs(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=4 << 20)
    run = b"".join(page_pattern(i) for i in range(16, 48))
    result = server.fill([(16 * PAGE, run), (0, page_pattern(0)), (1000 * PAGE, page_pattern(1000))])
    assert result == (34, 0)
    with Mapping(node_path(server.name), 4 << 20) as m:
        assert m.read(16 * PAGE, len(run)) == run
        assert m.read(1000 * PAGE, PAGE) == page_pattern(1000)


def test_zero_ranges_read_as_zeros_without_a_request(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    server.fill([(2 * PAGE, page_pattern(2))])
    assert server.zero(0, 8 * PAGE) == (7, 1)
    with Mapping(node_path(server.name), 1 << 20) as m:
        assert m.read(0, 2 * PAGE) == bytes(2 * PAGE)
        assert m.read(2 * PAGE, PAGE) == page_pattern(2)
        assert m.read(3 * PAGE, 5 * PAGE) == bytes(5 * PAGE)
    assert server.read_faults() == []
    stats = server.stats()
    assert (stats.zeroed, stats.present, stats.requested) == (7, 8, 0)


def test_poll_and_nonblocking_read(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    poller = select.poll()
    poller.register(server.fileno(), select.POLLIN)
    assert poller.poll(0) == []
    assert server.read_faults() == []
    with Mapping(node_path(server.name), 1 << 20) as m:
        reader = m.reader(9 * PAGE)
        assert poller.poll(10_000) == [(server.fileno(), select.POLLIN)]
        assert server.read_faults() == [Fault(9 * PAGE, write=False)]
        assert poller.poll(0) == []
        server.fill([(9 * PAGE, page_pattern(9))])
        reader.join(10)


def test_present_bitmap(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20)
    server.fill([(0, page_pattern(0)), (65 * PAGE, page_pattern(65))])
    server.zero(255 * PAGE, PAGE)
    bits = int.from_bytes(server.present_bitmap(), "little")
    assert bits == (1 << 0) | (1 << 65) | (1 << 255)
    assert int.from_bytes(server.present_bitmap(start=64, pages=64), "little") == 1 << 1
    missing = list(server.missing_pages())
    assert len(missing) == 253 and 0 not in missing and 65 not in missing


def half_mapped_page() -> int:
    """An address whose first 2 KiB are readable and whose next 2 KiB are not."""
    addr = libc.mmap(None, 2 * PAGE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    libc.munmap(addr + PAGE, PAGE)
    return int(addr) + PAGE // 2


def test_fault_around_never_maps_a_missing_page(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    server.fill([(p * PAGE, page_pattern(p)) for p in range(32) if p not in (5, 6)])
    # page 6: a fill that fails half way leaves bytes in the page cache
    with pytest.raises(DeviceError) as info:
        server.fill([(6 * PAGE, (ctypes.c_char * PAGE).from_address(half_mapped_page()))])
    assert info.value.errno == errno.EFAULT
    with Mapping(node_path(server.name), 1 << 20) as m:
        assert m.read(4 * PAGE, PAGE) == page_pattern(4)  # maps present neighbours too
        for missing in (5, 6):
            reader = m.reader(missing * PAGE)
            wait_until(lambda: waiters(server) == 1, what=f"a fault on page {missing}")
            assert server.read_faults() == [Fault(missing * PAGE, write=False)]
            server.fill([(missing * PAGE, page_pattern(missing))])
            reader.join(10)
            assert reader.data == page_pattern(missing)
        assert m.read(0, 32 * PAGE) == b"".join(page_pattern(p) for p in range(32))


def test_a_failed_fill_has_the_page_asked_for_again(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=1 << 20, nonblock=True)
    with Mapping(node_path(server.name), 1 << 20) as m:
        reader = m.reader(3 * PAGE)
        wait_until(lambda: waiters(server) == 1, what="the reader to wait")
        assert server.read_faults() == [Fault(3 * PAGE, write=False)]
        with pytest.raises(DeviceError):
            server.fill([(3 * PAGE, (ctypes.c_char * PAGE).from_address(half_mapped_page()))])
        wait_until(lambda: server.stats().requested == 2, what="the waiter to ask again")
        assert server.read_faults() == [Fault(3 * PAGE, write=False)]
        assert reader.is_alive()
        server.fill([(3 * PAGE, page_pattern(3))])
        reader.join(10)
        assert reader.data == page_pattern(3)


def test_a_fill_from_the_instances_own_missing_page_fails(make_instance: Callable[..., Server]) -> None:
    """The source is the very page being filled, through a mapping of the
    instance: the copy's fault would wait for the fill itself. EFAULT."""
    server = make_instance(size=1 << 20, nonblock=True)
    with Mapping(node_path(server.name), 1 << 20) as m:
        source = (ctypes.c_char * PAGE).from_address(m.addr + 3 * PAGE)
        result: list[int] = []

        def fill() -> None:
            try:
                server.fill([(3 * PAGE, source)])
            except DeviceError as e:
                result.append(e.errno)
            else:
                result.append(0)

        filler = threading.Thread(target=fill, daemon=True)
        filler.start()
        filler.join(60)  # a deadline, not a delay: the call returns at once or never
        assert not filler.is_alive(), "UMEM_FILL from the instance's own missing page deadlocked"
        assert result == [errno.EFAULT]
        stats = server.stats()
        assert (stats.present, stats.requested) == (0, 0)
        assert server.fill([(3 * PAGE, page_pattern(3))]) == (1, 0)
        assert m.read(3 * PAGE, PAGE) == page_pattern(3)


MADV_REMOVE = 9


def test_a_fill_waiting_for_its_source_holds_no_lock_on_the_page(make_instance: Callable[..., Server]) -> None:
    """A FILL whose source is slow (userfaultfd here; slow storage in life)
    must not hold the page's lock while it waits: MADV_REMOVE (truncation)
    of that page waits for the lock."""
    server = make_instance(size=1 << 20)
    with Userfault() as source, Mapping(node_path(server.name), 1 << 20) as m:
        filled: list[tuple[int, int]] = []
        removed: list[int] = []
        filler = threading.Thread(daemon=True, target=lambda: filled.append(
            server.fill([(2 * PAGE, (ctypes.c_char * PAGE).from_address(source.addr))])))
        filler.start()
        assert source.wait_fault() == source.addr  # the FILL now waits for its source
        remover = threading.Thread(daemon=True, target=lambda: removed.append(
            libc.madvise(ctypes.c_void_p(m.addr + 2 * PAGE), PAGE, MADV_REMOVE)))
        remover.start()
        remover.join(60)  # a deadline, not a delay: it returns at once or waits for the source
        blocked = remover.is_alive()
        source.supply(0, page_pattern(2))
        filler.join(10)
        remover.join(10)
        assert not blocked, "MADV_REMOVE of a page waited for the source of that page's FILL"
        assert removed == [0] and filled == [(1, 0)]
        assert m.read(2 * PAGE, PAGE) == page_pattern(2)
