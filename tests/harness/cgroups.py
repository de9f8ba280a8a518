"""cgroup2 directories a test process can enter and leave, with the memory
controller on (the test VM mounts cgroup2 at /sys/fs/cgroup)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class Cgroup:
    """A cgroup2 directory the test process can enter and leave."""

    def __init__(self, name: str) -> None:
        self.path = CGROUP_ROOT / name
        self.path.mkdir()

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        try:
            yield
        finally:
            (CGROUP_ROOT / "cgroup.procs").write_text(str(os.getpid()))

    def stat(self, key: str) -> int:
        """One field of memory.stat, in bytes (or events)."""
        for line in (self.path / "memory.stat").read_text().splitlines():
            name, value = line.split()
            if name == key:
                return int(value)
        raise AssertionError(f"no {key} line in {self.path}/memory.stat")

    def shmem_bytes(self) -> int:
        """Shared memory charged here (memory.stat ``shmem``): guest RAM, not the process's own
        anonymous memory, which khugepaged may charge to whatever cgroup the process is in when
        it collapses a huge page."""
        return self.stat("shmem")

    def remove(self) -> None:
        self.path.rmdir()


@contextlib.contextmanager
def memory_cgroups() -> Iterator[Callable[[str], Cgroup]]:
    """Make cgroups with the memory controller on; remove them at the end."""
    controllers = CGROUP_ROOT / "cgroup.subtree_control"
    if "memory" not in controllers.read_text().split():
        controllers.write_text("+memory")
    made: list[Cgroup] = []

    def make(name: str) -> Cgroup:
        made.append(Cgroup(f"umem-test-{os.getpid()}-{name}"))
        return made[-1]

    try:
        yield make
    finally:
        for cgroup in made:
            cgroup.remove()
