"""The source guest's RAM file, read-only: its pages, holes and zero runs.

QEMU's ``memory-backend-file,share=on`` keeps guest RAM in a file (in
/dev/shm or hugetlbfs) that outlives QEMU. The page server maps it
read-only and finds never-touched ranges with SEEK_DATA/SEEK_HOLE, so they
travel as zero hints instead of pages.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

from umemd.errors import UmemError
from umemd.protocol import PAGE_SIZE


class RamFile:
    """A read-only mapping of a RAM file."""

    def __init__(self, path: Path) -> None:
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UmemError(f"cannot open the RAM file {path}: {e.strerror} "
                            "(the source QEMU's memory-backend-file mem-path)") from e
        self.path = path
        self.size = os.fstat(self._fd).st_size
        if not self.size or self.size % PAGE_SIZE:
            os.close(self._fd)
            raise UmemError(f"{path} is {self.size} bytes: not a RAM file (not a nonzero multiple of the page size)")
        self._map = mmap.mmap(self._fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        self.view = memoryview(self._map)

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def close(self) -> None:
        self.view.release()
        self._map.close()
        os.close(self._fd)

    def data_extents(self) -> Iterator[tuple[int, int]]:
        """(start, end) byte ranges that may hold data; the rest are holes."""
        offset = 0
        while offset < self.size:
            try:
                start = os.lseek(self._fd, offset, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:  # only a hole is left
                    return
                raise
            end = os.lseek(self._fd, start, os.SEEK_HOLE)
            yield start - start % PAGE_SIZE, min(self.size, -(-end // PAGE_SIZE) * PAGE_SIZE)
            offset = end

    def is_zero(self, offset: int, length: int) -> bool:
        """Whether [offset, offset + length) reads as zeros (C-speed compare)."""
        return self.view[offset:offset + length] == _zeros(length)


_ZEROS = bytes(4 << 20)


def _zeros(length: int) -> memoryview:
    return memoryview(_ZEROS)[:length] if length <= len(_ZEROS) else memoryview(bytes(length))
