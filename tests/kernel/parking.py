"""The module's park points (kernel/testhooks.c, a UMEM_TEST_HOOKS=1 build).

A test arms a point, waits until a task is parked there, does what the race
needs while the window is held open, and lets the task go. The kernel
suite's lanes build the module with the hooks; so the tests that need them
never skip inside the VM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.harness.waiting import wait_until

PARK = Path("/sys/module/umem/parameters/park")


class Park:
    """Arm, watch and release the park points."""

    def arm(self, point: str) -> None:
        PARK.write_text(point)

    def parked(self) -> str:
        state = dict(field.split("=") for field in PARK.read_text().split())
        return state["parked"]

    def wait_parked(self, point: str) -> None:
        wait_until(lambda: self.parked() == point, timeout=60, what=f"a task parked at {point}")

    def go(self) -> None:
        PARK.write_text("go")


@contextmanager
def parking() -> Iterator[Park]:
    """A Park whose points are disarmed and whose parked task is let go at the end."""
    if not PARK.exists():
        raise AssertionError(f"{PARK} is missing: the kernel suite needs umem.ko built with "
                             "UMEM_TEST_HOOKS=1 (make test-kernel builds it in build/kmod-hooks)")
    park = Park()
    try:
        yield park
    finally:
        if PARK.exists():
            park.arm("none")
            park.go()
