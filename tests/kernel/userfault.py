"""A userfaultfd-registered anonymous region: memory whose pages arrive only
when the test supplies them, a stand-in for a slow source (a disk, the
network) under a kernel copy."""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct

from tests.harness.mapping import MAP_FAILED, libc
from umemd.protocol import PAGE_SIZE as PAGE

SYS_USERFAULTFD = 323  # x86-64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_COPY = 0xC028AA03  # _IOWR(0xAA, 0x03, struct uffdio_copy)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12
MSG_SIZE = 32


def _ioctl(fd: int, request: int, arg: ctypes.Array[ctypes.c_char]) -> None:
    if libc.ioctl(fd, ctypes.c_ulong(request), arg) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class Userfault:
    """``pages`` anonymous pages at :attr:`addr`, every one missing until :meth:`supply`."""

    def __init__(self, pages: int = 1) -> None:
        self.length = pages * PAGE
        fd = libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        self.fd: int = fd
        api = ctypes.create_string_buffer(struct.pack("QQQ", UFFD_API, 0, 0), 24)
        _ioctl(self.fd, UFFDIO_API, api)
        addr = libc.mmap(None, self.length, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr == MAP_FAILED:
            raise OSError(ctypes.get_errno(), "mmap")
        self.addr: int = addr
        reg = ctypes.create_string_buffer(struct.pack("QQQQ", addr, self.length, UFFDIO_REGISTER_MODE_MISSING, 0), 32)
        _ioctl(self.fd, UFFDIO_REGISTER, reg)

    def wait_fault(self, timeout: float = 60.0) -> int:
        """The address of the next missing-page fault (a deadline, not a delay)."""
        if not select.select([self.fd], [], [], timeout)[0]:
            raise AssertionError(f"no userfault within {timeout} s")
        msg = os.read(self.fd, MSG_SIZE)
        event, address = msg[0], struct.unpack_from("Q", msg, 16)[0]
        assert event == UFFD_EVENT_PAGEFAULT, f"userfaultfd event {event:#x}"
        return int(address)

    def supply(self, offset: int, data: bytes) -> None:
        """Install ``data`` (whole pages) at ``offset`` and wake the faulting task."""
        src = ctypes.create_string_buffer(data, len(data))
        copy = ctypes.create_string_buffer(struct.pack("QQQQq", self.addr + offset, ctypes.addressof(src),
                                                       len(data), 0, 0), 40)
        _ioctl(self.fd, UFFDIO_COPY, copy)

    def close(self) -> None:
        os.close(self.fd)  # wakes any task still waiting: its fault then fails
        libc.munmap(self.addr, self.length)

    def __enter__(self) -> Userfault:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
