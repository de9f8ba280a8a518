"""Map umem instance nodes and touch them from threads without the GIL.

A thread that faults on a missing page sleeps in the kernel; it must not
hold the GIL meanwhile, or the server thread could never fill the page.
ctypes foreign calls (memmove) release the GIL, so every access here goes
through libc.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

from umemd.protocol import PAGE_SIZE

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_FAILED = ctypes.c_void_p(-1).value
MAP_FIXED = 0x10
PROT_NONE = 0


class Mapping:
    """A MAP_SHARED mapping of an instance node."""

    def __init__(self, path: Path | str, length: int, offset: int = 0, flags: int = mmap.MAP_SHARED,
                 fixed_address: int | None = None) -> None:
        if fixed_address is not None:
            flags |= MAP_FIXED
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            addr = libc.mmap(fixed_address, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, offset)
            if addr == MAP_FAILED:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)
        self.addr: int = addr
        self.length = length
        self._readers: list[Reader] = []

    def reader(self, offset: int, length: int = PAGE_SIZE) -> Reader:
        """Start a thread that reads ``length`` bytes at ``offset``."""
        reader = Reader(self, offset, length)
        self._readers.append(reader)
        return reader

    def read(self, offset: int, n: int) -> bytes:
        buf = ctypes.create_string_buffer(n)
        ctypes.memmove(buf, self.addr + offset, n)
        return buf.raw

    def write(self, offset: int, data: bytes) -> None:
        ctypes.memmove(self.addr + offset, data, len(data))

    def close(self) -> None:
        """Unmap, unless a reader still waits for a page: unmapping under it
        would turn a failed test into a crash (the fixture that made the
        instance releases such readers, and the mapping leaks)."""
        for reader in self._readers:
            reader.join(2)
        if self.length and not any(r.is_alive() for r in self._readers):
            libc.munmap(self.addr, self.length)
        self.length = 0

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def page_pattern(index: int, seed: int = 0) -> bytes:
    """4 KiB that identify page ``index``: every 8-byte word differs."""
    head = f"page {index:010d} seed {seed:06d} ".encode()
    return (head * (PAGE_SIZE // len(head) + 1))[:PAGE_SIZE]


class Reader(threading.Thread):
    """A thread that reads from a mapping (and may block on a missing page)."""

    def __init__(self, mapping: Mapping, offset: int, length: int) -> None:
        super().__init__(daemon=True)
        self.mapping, self.offset, self.length = mapping, offset, length
        self.data: bytes | None = None
        self.start()

    def run(self) -> None:
        self.data = self.mapping.read(self.offset, self.length)


def aligned_mapping(path: Path | str, length: int, align: int) -> Mapping:
    """A MAP_SHARED mapping of ``path`` whose address is a multiple of ``align``
    (so that a huge page could cover it)."""
    reserve = libc.mmap(None, length + align, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if reserve == MAP_FAILED:
        raise OSError(ctypes.get_errno(), "cannot reserve address space")
    start = (reserve + align - 1) // align * align
    if start > reserve:
        libc.munmap(reserve, start - reserve)
    libc.munmap(start + length, reserve + length + align - start - length)
    return Mapping(path, length, fixed_address=start)
