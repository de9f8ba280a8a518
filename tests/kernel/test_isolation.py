"""Each guest's memory is reachable only by its own QEMU.

Tried as a hostile process in group kvm and as an unlucky operator would:
another uid of the group opening a node, a stale reference to a destroyed
node, MADV_COLLAPSE over missing pages, fill pages charged to the filler's
memory cgroup, counters that need the server fd.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import grp
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.harness.cgroups import Cgroup
from tests.harness.command import umemd_command
from tests.harness.mapping import Mapping, aligned_mapping, libc, page_pattern
from tests.harness.waiting import wait_until
from umemd import Control, NodeOwner, Server, node_path, read_counters
from umemd.protocol import PAGE_SIZE as PAGE

HUGE = 2 << 20
MADV_COLLAPSE = 25
NOBODY = 65534


def open_as(path: Path | str, uid: int, gid: int, groups: list[int]) -> subprocess.CompletedProcess[str]:
    """Open ``path`` read-write as another user (a shell redirection: no Python to import)."""
    return subprocess.run(["/bin/sh", "-c", 'exec 3<>"$0"', str(path)], user=uid, group=gid, extra_groups=groups,
                          capture_output=True, text=True)


def kvm_gid() -> int:
    return grp.getgrnam("kvm").gr_gid


# ---- 1. the node's owner, group and mode come from CREATE --------------


def test_another_uid_of_group_kvm_cannot_open_a_node(make_instance: Callable[..., Server]) -> None:
    server = make_instance()
    subprocess.run(["udevadm", "settle"], check=False)  # whatever a rule would do, it has done
    hostile = open_as(node_path(server.name), NOBODY, kvm_gid(), [kvm_gid()])
    assert hostile.returncode != 0, f"uid {NOBODY} of group kvm opened {node_path(server.name)}"
    assert "Permission denied" in hostile.stderr
    st = os.stat(node_path(server.name))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_the_owner_named_at_create_opens_the_node_and_nobody_else(make_instance: Callable[..., Server]) -> None:
    owner, other = 4242, NOBODY
    server = make_instance(owner=NodeOwner(owner, kvm_gid(), 0o600))
    subprocess.run(["udevadm", "settle"], check=False)
    st = os.stat(node_path(server.name))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner, kvm_gid(), 0o600)
    assert open_as(node_path(server.name), owner, owner, []).returncode == 0
    assert open_as(node_path(server.name), other, kvm_gid(), [kvm_gid()]).returncode != 0


# ---- 2. a stale reference never reaches another instance ---------------


@contextlib.contextmanager
def bind_mounted(source: Path, target: Path) -> Iterator[Path]:
    target.touch()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_destroyed_nodes_stale_references_open_nothing(
    control: Control, make_instance: Callable[..., Server], tmp_path: Path
) -> None:
    old = make_instance()
    o_path = os.open(node_path(old.name), os.O_PATH)
    try:
        with bind_mounted(node_path(old.name), tmp_path / "bound-node") as bound:
            old.close()
            control.destroy(old.name)
            new = make_instance()
            assert node_path(new.name).exists()
            for stale in (f"/proc/self/fd/{o_path}", str(bound)):
                with pytest.raises(OSError) as info:
                    os.close(os.open(stale, os.O_RDWR))
                assert info.value.errno in (errno.ENXIO, errno.ENODEV), stale
    finally:
        os.close(o_path)


# ---- 3. no huge page over a missing one --------------------------------


def pmd_mapped_kib(address: int) -> int:
    """FilePmdMapped + ShmemPmdMapped of the vma at ``address`` in /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split()[0] and ":" not in line.split()[0]:
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.split()[0] in ("FilePmdMapped:", "ShmemPmdMapped:"):
            total += int(line.split()[1])
    return total


def test_madv_collapse_never_maps_a_missing_page(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=2 * HUGE, nonblock=True)
    server.fill([(0, page_pattern(0))])
    with aligned_mapping(node_path(server.name), HUGE, HUGE) as mapping:
        assert mapping.read(0, PAGE) == page_pattern(0)
        libc.madvise(ctypes.c_void_p(mapping.addr), ctypes.c_size_t(HUGE), MADV_COLLAPSE)
        assert pmd_mapped_kib(mapping.addr) == 0, "a huge page maps pages that are not present"
        reader = mapping.reader(5 * PAGE)
        wait_until(lambda: not reader.is_alive() or server.stats().waiters > 0, what="the reader to wait or end")
        assert reader.is_alive(), f"a missing page read as {reader.data[:16]!r} with no fault"
        assert [f.offset for f in server.read_faults()] == [5 * PAGE]
        server.fill([(5 * PAGE, page_pattern(5))])
        reader.join()
        assert reader.data == page_pattern(5)


# ---- 4. guest RAM is charged to the guest's memory cgroup --------------


FILLED = 1024  # pages: 4 MiB


def fill_from(server: Server, daemon: Cgroup) -> None:
    image = b"".join(page_pattern(i) for i in range(FILLED))  # allocated before entering the daemon's cgroup
    with daemon.entered():
        assert server.fill([(0, image)]).done == FILLED


def test_fill_pages_are_charged_to_the_first_mappers_cgroup(
    make_instance: Callable[..., Server], cgroups: Callable[[str], Cgroup]
) -> None:
    guest, daemon = cgroups("guest"), cgroups("daemon")
    server = make_instance(size=FILLED * PAGE)
    with guest.entered():
        mapping = Mapping(node_path(server.name), FILLED * PAGE)
    try:
        fill_from(server, daemon)
        assert daemon.shmem_bytes() < FILLED * PAGE // 4, "the filler's cgroup pays for the guest's RAM"
        assert guest.shmem_bytes() >= FILLED * PAGE * 3 // 4  # memory.stat may lag by a per-CPU batch
        assert mapping.read(7 * PAGE, PAGE) == page_pattern(7)
    finally:
        mapping.close()


def test_fill_pages_are_charged_to_the_cgroup_named_at_create(
    make_instance: Callable[..., Server], cgroups: Callable[[str], Cgroup]
) -> None:
    guest, daemon, qemu = cgroups("guest"), cgroups("daemon"), cgroups("qemu")
    server = make_instance(size=FILLED * PAGE, cgroup=guest.path)
    with qemu.entered():
        mapping = Mapping(node_path(server.name), FILLED * PAGE)
    try:
        fill_from(server, daemon)
        assert daemon.shmem_bytes() < FILLED * PAGE // 4
        assert qemu.shmem_bytes() < FILLED * PAGE // 4
        assert guest.shmem_bytes() >= FILLED * PAGE * 3 // 4
    finally:
        mapping.close()


FAULT_FLOOD = Path(os.environ.get("UMEM_FAULT_FLOOD",
                                  Path(__file__).resolve().parents[2] / "build" / "fault_flood"))
RECORDS = 8192  # fault records, 32 bytes of kmalloc each


def test_queued_fault_records_are_charged_to_the_mappers_cgroup(
    make_instance: Callable[..., Server], cgroups: Callable[[str], Cgroup]
) -> None:
    """One mapper can queue a record per page, served or not (fault_flood.c):
    on a 1 TiB instance, 8 GiB of slab. It pays for them."""
    mapper = cgroups("mapper")
    server = make_instance(size=RECORDS * PAGE)
    counter = Path(f"/sys/class/umem/umem!{server.name}/stats/requested")
    before = mapper.stat("slab_unreclaimable")
    with mapper.entered():
        flood = subprocess.run([str(FAULT_FLOOD), str(node_path(server.name)), str(RECORDS), str(counter)],
                               capture_output=True, text=True, timeout=600)
    assert flood.returncode == 0 and flood.stdout.strip() == str(RECORDS), flood.stderr
    assert server.stats().requested == RECORDS  # all still queued: nobody has read one

    def charged() -> int:
        return mapper.stat("slab_unreclaimable") - before

    with contextlib.suppress(AssertionError):  # memory.stat is flushed every 2 s at most
        wait_until(lambda: charged() >= RECORDS * 32 * 3 // 4, what="the records' charge")
    assert charged() >= RECORDS * 32 * 3 // 4, \
        f"{RECORDS} queued fault records charged {charged()} bytes of slab to the mapper's cgroup"


# ---- 5. counters without the server fd ---------------------------------


def test_counters_are_readable_while_a_server_is_attached(make_instance: Callable[..., Server]) -> None:
    server = make_instance(size=2 << 20)
    server.zero(0, 3 * PAGE)
    result = subprocess.run(umemd_command("stats", server.name), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == asdict(server.stats())
    assert read_counters(server.name) == server.stats()
