"""Every ioctl error path, each with all other inputs valid, gets its
documented errno (docs/kernel-abi.md); random ioctls harm nothing."""

from __future__ import annotations

import errno
import mmap
import os
import random
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.mapping import Mapping
from tests.harness.waiting import task_state, wait_until
from umemd import Control, Server, node_path
from umemd._umem_abi import ffi, lib
from umemd.device import CONTROL_PATH
from umemd.protocol import PAGE_SIZE
from umemd.protocol import PAGE_SIZE as PAGE

from .userfault import Userfault

SIZE = 1 << 20
BAD_POINTER = 0x10  # never mapped


def ioctl_errno(fd: int, request: int, arg: Any) -> int:
    ffi.errno = 0
    return 0 if lib.ioctl(fd, request, arg) == 0 else ffi.errno


def address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


@pytest.fixture
def raw_control() -> Iterator[int]:
    """A control fd before the UMEM_API handshake."""
    fd = os.open(CONTROL_PATH, os.O_RDWR)
    yield fd
    os.close(fd)


def api(**fields: int) -> Any:
    return ffi.new("struct umem_api *", {"api": lib.UMEM_API_VERSION, "features": 0, **fields})


def create_req(name: bytes = b"bad-input", **fields: int) -> Any:
    req = ffi.new("struct umem_create *", {"argsz": ffi.sizeof("struct umem_create"), "size": SIZE, **fields})
    ffi.memmove(req.name, name, len(name))
    return req


def grown_create_req(extra: bytes) -> Any:
    """A struct umem_create from a newer caller: this one plus ``extra``."""
    size = ffi.sizeof("struct umem_create")
    buf = ffi.new("char[]", size + len(extra))
    ffi.memmove(buf, ffi.buffer(create_req()), size)
    ffi.memmove(buf + size, extra, len(extra))
    req = ffi.cast("struct umem_create *", buf)
    req.argsz = size + len(extra)
    return buf


# ---- control node ------------------------------------------------------


def test_commands_before_the_handshake_are_refused(raw_control: int) -> None:
    assert ioctl_errno(raw_control, lib.UMEM_CREATE, create_req()) == errno.EINVAL
    assert ioctl_errno(raw_control, lib.UMEM_LIST, ffi.new("struct umem_list *")) == errno.EINVAL


@pytest.mark.parametrize(
    ("fields", "expected"),
    [({"api": lib.UMEM_API_VERSION + 1}, errno.EINVAL), ({"features": 1 << 63}, errno.EINVAL)],
    ids=["wrong-version", "unknown-feature"],
)
def test_bad_handshake(raw_control: int, fields: dict[str, int], expected: int) -> None:
    req = api(**fields)
    assert ioctl_errno(raw_control, lib.UMEM_API, req) == expected
    assert req.features == 0 and req.ioctls == 0


def test_handshake_answers_features_and_ioctls_once(raw_control: int) -> None:
    req = api(features=lib.UMEM_FEATURE_ZERO)
    assert ioctl_errno(raw_control, lib.UMEM_API, req) == 0
    assert req.features == lib.UMEM_API_FEATURES
    assert req.ioctls == lib.UMEM_CONTROL_IOCTLS | lib.UMEM_SERVER_IOCTLS
    assert ioctl_errno(raw_control, lib.UMEM_API, api()) == errno.EINVAL


def test_two_handshakes_racing_on_one_fd_cannot_both_succeed(raw_control: int) -> None:
    """The first UMEM_API is held inside the ioctl (its struct is a userfaultfd
    page) while a second one runs on the same fd: that one waits, then fails."""
    results: dict[str, int] = {}

    def handshake(key: str, arg: Any) -> None:
        results[key] = ioctl_errno(raw_control, lib.UMEM_API, arg)

    with Userfault() as held:
        first = threading.Thread(target=handshake, args=("first", ffi.cast("struct umem_api *", held.addr)),
                                 daemon=True)
        first.start()
        assert held.wait_fault() == held.addr  # the first is inside UMEM_API, reading its struct
        second = threading.Thread(target=handshake, args=("second", api()), daemon=True)
        second.start()
        assert second.native_id is not None
        tid = second.native_id
        wait_until(lambda: not second.is_alive() or task_state(tid) == "D",
                   what="the second handshake to return or to wait for the first")
        early = results.get("second")
        held.supply(0, struct.pack("QQQ", lib.UMEM_API_VERSION, 0, 0).ljust(PAGE, b"\0"))
        first.join(10)
        second.join(10)
    assert early is None, f"a second UMEM_API returned {early} while the first was still inside the ioctl"
    assert results == {"first": 0, "second": errno.EINVAL}


@pytest.mark.parametrize(
    ("name", "fields", "expected"),
    [
        (b"bad-input", {"size": 0}, errno.EINVAL),
        (b"bad-input", {"size": SIZE + 1}, errno.EINVAL),
        (b"bad-input", {"size": lib.UMEM_SIZE_MAX + PAGE_SIZE}, errno.EFBIG),
        (b"bad-input", {"flags": 1 << 5}, errno.EINVAL),
        (b"bad-input", {"flags": 1 << 11}, errno.EINVAL),
        (b"bad-input", {"pad": 1}, errno.EINVAL),
        (b"x" * 64, {}, errno.EINVAL),
        (b"", {}, errno.EINVAL),
        (b"caf\xe9", {}, errno.EINVAL),
        (b"bad-input", {"argsz": 0}, errno.EINVAL),
        (b"bad-input", {"argsz": lib.UMEM_CREATE_SIZE_VER0 - 8}, errno.EINVAL),
        (b"bad-input", {"argsz": 1 << 20}, errno.E2BIG),
        (b"bad-input", {"uid": 1000}, errno.EINVAL),
        (b"bad-input", {"gid": 1000}, errno.EINVAL),
        (b"bad-input", {"mode": 0o600}, errno.EINVAL),
        (b"bad-input", {"flags": lib.UMEM_CREATE_MODE}, errno.EINVAL),
        (b"bad-input", {"flags": lib.UMEM_CREATE_MODE, "mode": 0o4600}, errno.EINVAL),
        (b"bad-input", {"flags": lib.UMEM_CREATE_OWNER, "uid": 2**32 - 1}, errno.EINVAL),
        (b"bad-input", {"cgroup_fd": 3}, errno.EINVAL),
        (b"bad-input", {"flags": lib.UMEM_CREATE_CGROUP, "cgroup_fd": -1}, errno.EBADF),
        (b"bad-input", {"flags": lib.UMEM_CREATE_CGROUP, "cgroup_fd": 0}, errno.EBADF),
    ],
    ids=["zero-size", "unaligned-size", "huge-size", "unknown-fd-flag", "unknown-create-flag", "nonzero-pad",
         "unterminated-name", "empty-name", "latin-1-name", "no-argsz", "argsz-too-small", "argsz-too-big",
         "uid-without-flag", "gid-without-flag", "mode-without-flag", "mode-zero", "mode-setuid", "invalid-uid",
         "cgroup-fd-without-flag", "bad-cgroup-fd", "cgroup-fd-not-a-cgroup"],
)
def test_bad_create(control: Control, name: bytes, fields: dict[str, int], expected: int) -> None:
    assert ioctl_errno(control.fileno(), lib.UMEM_CREATE, create_req(name, **fields)) == expected
    assert "bad-input" not in {i.name for i in control.list()}


def test_a_newer_callers_longer_create_is_taken_when_the_rest_is_zero(control: Control) -> None:
    assert ioctl_errno(control.fileno(), lib.UMEM_CREATE, grown_create_req(bytes([0, 0, 1, 0]))) == errno.E2BIG
    assert "bad-input" not in {i.name for i in control.list()}
    fd = lib.ioctl(control.fileno(), lib.UMEM_CREATE, grown_create_req(bytes(64)))
    assert fd >= 0
    os.close(fd)
    assert "bad-input" in {i.name for i in control.list()}
    control.destroy("bad-input")


@pytest.mark.parametrize(("fields", "expected"), [({"flags": 1 << 5}, errno.EINVAL),
                                               ({"flags": lib.UMEM_CREATE_OWNER}, errno.EINVAL)],
                         ids=["unknown-flag", "create-only-flag"])
def test_bad_attach(control: Control, make_instance: Callable[..., Server], fields: dict[str, int],
                    expected: int) -> None:
    server = make_instance(size=SIZE)
    server.close()
    req = ffi.new("struct umem_attach *", fields)
    ffi.memmove(req.name, server.name.encode(), len(server.name))
    assert ioctl_errno(control.fileno(), lib.UMEM_ATTACH, req) == expected


def test_bad_pointers_on_the_control_node(control: Control, make_instance: Callable[..., Server]) -> None:
    make_instance(size=SIZE)
    fd = control.fileno()
    assert ioctl_errno(fd, lib.UMEM_CREATE, ffi.cast("void *", BAD_POINTER)) == errno.EFAULT
    listing = ffi.new("struct umem_list *", {"entries": BAD_POINTER, "capacity": 4})
    assert ioctl_errno(fd, lib.UMEM_LIST, listing) == errno.EFAULT
    assert ioctl_errno(fd, lib.UMEM_ATTACH, ffi.cast("void *", BAD_POINTER)) == errno.EFAULT


def test_unknown_and_foreign_ioctls_on_the_control_node(control: Control) -> None:
    fd = control.fileno()
    assert ioctl_errno(fd, lib.UMEM_FILL, ffi.new("struct umem_fill *")) == errno.ENOTTY
    assert ioctl_errno(fd, lib.UMEM_IOCTL_MAGIC << 8 | 0x7F, ffi.NULL) == errno.ENOTTY


# ---- server fd ---------------------------------------------------------


@pytest.fixture
def server(make_instance: Callable[..., Server]) -> Server:
    return make_instance(size=SIZE)


PAGE_BUF = ffi.new("char[]", 2 * PAGE_SIZE)


def fill_errno(server: Server, ranges: list[dict[str, int]], **fields: int) -> int:
    array = ffi.new("struct umem_fill_range[]", ranges) if ranges else ffi.NULL
    req = ffi.new("struct umem_fill *", {"ranges": address(array) if ranges else 0, "count": len(ranges), **fields})
    return ioctl_errno(server.fileno(), lib.UMEM_FILL, req)


def good_range(**fields: int) -> dict[str, int]:
    return {"offset": 0, "len": PAGE_SIZE, "src": address(PAGE_BUF), **fields}


@pytest.mark.parametrize(
    ("ranges", "fields", "expected"),
    [
        ([good_range()], {"flags": 1}, errno.EINVAL),
        ([], {}, errno.EINVAL),
        ([good_range()] * (lib.UMEM_FILL_MAX_RANGES + 1), {}, errno.EINVAL),
        ([good_range(offset=1)], {}, errno.EINVAL),
        ([good_range(len=100)], {}, errno.EINVAL),
        ([good_range(len=0)], {}, errno.EINVAL),
        ([good_range(offset=SIZE)], {}, errno.EINVAL),
        ([good_range(offset=SIZE - PAGE_SIZE, len=2 * PAGE_SIZE)], {}, errno.EINVAL),
        ([good_range(offset=PAGE_SIZE, len=2**64 - PAGE_SIZE)], {}, errno.EINVAL),
        ([good_range(src=0)], {}, errno.EINVAL),
        ([good_range(src=BAD_POINTER)], {}, errno.EFAULT),
        ([good_range(), good_range(offset=1)], {}, errno.EINVAL),
    ],
    ids=["flags", "no-ranges", "too-many-ranges", "unaligned-offset", "unaligned-len", "zero-len", "offset-at-end",
         "past-the-end", "wrapping-len", "null-src", "bad-src", "second-range-bad"],
)
def test_bad_fill(server: Server, ranges: list[dict[str, int]], fields: dict[str, int], expected: int) -> None:
    assert fill_errno(server, ranges, **fields) == expected
    assert server.stats().present == 0, "a refused fill made pages present"


def test_fill_with_a_bad_range_array(server: Server) -> None:
    req = ffi.new("struct umem_fill *", {"ranges": BAD_POINTER, "count": 1})
    assert ioctl_errno(server.fileno(), lib.UMEM_FILL, req) == errno.EFAULT


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"flags": 1}, errno.EINVAL),
        ({"offset": 1}, errno.EINVAL),
        ({"len": 1}, errno.EINVAL),
        ({"len": 0}, errno.EINVAL),
        ({"offset": SIZE}, errno.EINVAL),
        ({"offset": PAGE_SIZE, "len": SIZE}, errno.EINVAL),
    ],
    ids=["flags", "unaligned-offset", "unaligned-len", "zero-len", "offset-at-end", "past-the-end"],
)
def test_bad_zero(server: Server, fields: dict[str, int], expected: int) -> None:
    req = ffi.new("struct umem_zero *", {"offset": 0, "len": PAGE_SIZE, **fields})
    assert ioctl_errno(server.fileno(), lib.UMEM_ZERO, req) == expected
    assert server.stats().present == 0


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"start": 1}, errno.EINVAL),
        ({"start": SIZE // PAGE_SIZE}, errno.EINVAL),
        ({"pages": 0}, errno.EINVAL),
        ({"start": 64, "pages": SIZE // PAGE_SIZE}, errno.EINVAL),
        ({"bitmap": BAD_POINTER}, errno.EFAULT),
    ],
    ids=["unaligned-start", "start-at-end", "zero-pages", "past-the-end", "bad-pointer"],
)
def test_bad_bitmap(server: Server, fields: dict[str, int], expected: int) -> None:
    words = ffi.new("uint64_t[]", 8)
    req = ffi.new("struct umem_bitmap *", {"start": 0, "pages": 64, "bitmap": address(words), **fields})
    assert ioctl_errno(server.fileno(), lib.UMEM_BITMAP, req) == expected


def test_short_read_buffer(server: Server) -> None:
    with pytest.raises(OSError) as info:
        os.read(server.fileno(), ffi.sizeof("struct umem_fault") - 1)
    assert info.value.errno == errno.EINVAL


def test_server_fd_has_no_write_and_no_control_ioctls(server: Server) -> None:
    with pytest.raises(OSError) as info:
        os.write(server.fileno(), bytes(PAGE_SIZE))
    assert info.value.errno == errno.EINVAL
    assert ioctl_errno(server.fileno(), lib.UMEM_CREATE, create_req()) == errno.ENOTTY
    assert ioctl_errno(server.fileno(), lib.UMEM_STATS, ffi.cast("void *", BAD_POINTER)) == errno.EFAULT


# ---- instance node -----------------------------------------------------


def test_instance_node_serves_no_pages(server: Server) -> None:
    fd = os.open(node_path(server.name), os.O_RDWR)
    try:
        for call in (lambda: os.read(fd, PAGE_SIZE), lambda: os.write(fd, bytes(PAGE_SIZE))):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EINVAL
        assert ioctl_errno(fd, lib.UMEM_FILL, ffi.new("struct umem_fill *")) == errno.ENOTTY
        assert ioctl_errno(fd, lib.UMEM_API, api()) == errno.ENOTTY
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("length", "offset", "flags", "expected"),
    [
        (SIZE, 0, mmap.MAP_PRIVATE, errno.EINVAL),
        (SIZE + PAGE_SIZE, 0, mmap.MAP_SHARED, errno.ENXIO),
        (PAGE_SIZE, SIZE, mmap.MAP_SHARED, errno.ENXIO),
    ],
    ids=["map-private", "longer-than-the-instance", "offset-past-the-end"],
)
def test_bad_mmap(server: Server, length: int, offset: int, flags: int, expected: int) -> None:
    with pytest.raises(OSError) as info:
        Mapping(node_path(server.name), length, offset, flags)
    assert info.value.errno == expected


# ---- fuzz --------------------------------------------------------------


CREATE_FLAGS = [lib.UMEM_FD_CLOEXEC, lib.UMEM_FD_NONBLOCK, lib.UMEM_CREATE_OWNER, lib.UMEM_CREATE_MODE,
                lib.UMEM_CREATE_CGROUP, 1 << 11, 1 << 63]


def random_create(rng: random.Random, scratch: Any) -> Any:
    """A struct umem_create that is almost valid: random new fields, flags and argsz."""
    size = ffi.sizeof("struct umem_create")
    ffi.memmove(scratch, bytes(512), 512)
    req = ffi.cast("struct umem_create *", scratch)
    req.argsz = rng.choice([size, size - 8, size + 8, size + 64, 0, rng.randrange(1 << 13)])
    req.size = rng.choice([PAGE_SIZE, SIZE, SIZE + 1, 0])
    req.flags = sum(flag for flag in CREATE_FLAGS if rng.random() < 0.3)
    req.uid, req.gid = rng.choice([0, 1000, 65534, 2**32 - 1]), rng.choice([0, 1000, 2**32 - 1])
    req.mode = rng.choice([0, 0o600, 0o777, 0o1777, rng.getrandbits(32)])
    req.cgroup_fd = rng.choice([0, -1, 3, rng.randrange(64)])
    ffi.memmove(req.tag, rng.randbytes(16), 16)
    name = f"fuzz-{rng.randrange(4)}".encode()
    ffi.memmove(req.name, name, len(name))
    if rng.random() < 0.2:
        ffi.memmove(scratch + size, rng.randbytes(8), 8)
    return scratch


def random_arg(rng: random.Random, scratch: Any) -> Any:
    """A pointer to random bytes, a wild pointer, a small integer, or an almost valid CREATE."""
    choice = rng.randrange(4)
    if choice == 3:
        return random_create(rng, scratch)
    if choice == 0:
        data = rng.randbytes(256)
        ffi.memmove(scratch, data, len(data))
        return scratch
    if choice == 1:
        return ffi.cast("void *", rng.choice([0, BAD_POINTER, 2**47, 2**64 - PAGE_SIZE, rng.getrandbits(64)]))
    return ffi.cast("void *", rng.randrange(1 << 16))


KNOWN_REQUESTS = [getattr(lib, name) for name in
                  ("UMEM_API", "UMEM_CREATE", "UMEM_ATTACH", "UMEM_DESTROY", "UMEM_LIST",
                   "UMEM_FILL", "UMEM_ZERO", "UMEM_STATS", "UMEM_BITMAP")]


def random_request(rng: random.Random) -> int:
    draw = rng.random()
    if draw < 0.4:  # a real command with a random argument
        return rng.choice(KNOWN_REQUESTS)
    if draw < 0.8:  # our magic, any number, size and direction
        direction = rng.choice([0, 1, 2, 3])
        return direction << 30 | rng.randrange(256) << 16 | lib.UMEM_IOCTL_MAGIC << 8 | rng.randrange(0x20)
    return rng.getrandbits(32)


def test_random_ioctls_on_every_kind_of_file(control: Control, server: Server) -> None:
    rng = random.Random(0x0E11)
    scratch = ffi.new("char[]", 4096)
    node = os.open(node_path(server.name), os.O_RDWR)
    fresh_control = os.open(CONTROL_PATH, os.O_RDWR)
    try:
        for _ in range(4000):
            fd = rng.choice([control.fileno(), server.fileno(), node, fresh_control])
            request = random_request(rng)
            result = lib.ioctl(fd, request, random_arg(rng, scratch))
            if request in (lib.UMEM_CREATE, lib.UMEM_ATTACH) and result >= 0:
                os.close(result)  # a server fd
    finally:
        os.close(node)
        os.close(fresh_control)
    for info in control.list():
        if info.name != server.name and not info.name.startswith("t"):
            control.destroy(info.name)  # whatever a random CREATE made
    assert server.stats().size == SIZE
