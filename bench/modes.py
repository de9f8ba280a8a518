"""Migration modes: what differs between the columns of the benchmark.

A :class:`Mode` says which capabilities and parameters both QEMUs get, what
extra command-line arguments each needs, what runs on the destination before
``migrate-incoming``, how the switch-over happens, and which numbers it adds.
:mod:`bench.run` does the rest the same way for every mode.

The three upstream modes are here; umem, the fourth, is
:class:`bench.umem_mode.UmemMode` (its daemons start in ``before_destination``,
since the destination QEMU refuses a node that does not exist yet).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.harness.machine import Settings

if TYPE_CHECKING:
    from tests.harness.machine import GuestImage
    from tests.harness.topology import HostVm, RemoteVm, Topology


@dataclass
class RunContext:
    """One run of one mode, handed to the mode's hooks."""

    topo: Topology
    mode: Mode
    guest: GuestImage
    settings: Settings
    index: int
    workdir: Path               # on the host: serial logs, QEMU output, trace
    src: HostVm | None = None
    dst: RemoteVm | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"{self.mode.name}-{self.index}"


class Mode:
    name = "?"
    title = "?"
    postcopy = False
    #: guest ports the topology must forward besides BASE_PORTS (name -> port)
    extra_ports: dict[str, int] = {}  # noqa: RUF012  (read-only class default)
    #: options for ``python3 -m tests.harness.vm`` (modules, udev rules)
    vm_args: list[str] = []  # noqa: RUF012
    #: QEMU trace events enabled on the destination (log backend, ``-D``)
    trace_events: tuple[str, ...] = ()

    def capabilities(self) -> dict[str, bool]:
        """Migration capabilities, set on both sides before ``migrate-incoming``."""
        return {"events": True}

    def source_parameters(self, settings: Settings) -> dict[str, Any]:
        return {}

    def source_args(self, ctx: RunContext) -> list[str]:
        return []

    def destination_args(self, ctx: RunContext) -> list[str]:
        return []

    async def before_destination(self, ctx: RunContext) -> None:
        """Destination-side preparation before its QEMU starts (after the source's first pass)."""

    async def before_incoming(self, ctx: RunContext) -> None:
        """Destination-side preparation, after both QEMUs are up and configured."""

    async def switch_over(self, ctx: RunContext) -> None:
        """Called right after ``migrate``: whatever makes the migration switch over."""

    async def after_completed(self, ctx: RunContext) -> None:
        """After both QEMUs report ``completed``: wait for whatever else must finish first."""

    async def collect(self, ctx: RunContext) -> dict[str, Any]:
        """Mode-specific numbers, after the run, before the QEMUs quit. Its ``overrides``
        replace the generic numbers of the record (e.g. a total time QEMU cannot see)."""
        return {}

    async def cleanup(self, ctx: RunContext) -> None:
        """After the run, success or not."""


class Precopy(Mode):
    """Plain pre-copy. The guest rewrites 16 MiB continuously, so over ~20 MB/s
    it converges only with a downtime limit near a second: 2 s, as in
    tests/qemu/test_migration.py; bandwidth unlimited (the default, 128 MiB/s,
    would be a cap of its own)."""

    name = "precopy"
    title = "pre-copy"

    def source_parameters(self, settings: Settings) -> dict[str, Any]:
        return {"downtime-limit": 2000, "max-bandwidth": 4 << 30}


class Postcopy(Mode):
    """Upstream post-copy (userfaultfd): ``migrate``, then ``migrate-start-postcopy``
    as soon as the migration is active (after ``postcopy_after_s`` of pre-copy,
    0 by default, the setting closest to umem, which sends no RAM before the
    switch-over). Page requests are timed from QEMU's own trace events."""

    name = "postcopy"
    title = "postcopy-ram"
    postcopy = True
    trace_events = ("postcopy_ram_fault_thread_request", "postcopy_page_req_add", "postcopy_page_req_del")

    def capabilities(self) -> dict[str, bool]:
        return {**super().capabilities(), "postcopy-ram": True, "postcopy-blocktime": True}

    def source_parameters(self, settings: Settings) -> dict[str, Any]:
        return {"max-bandwidth": 4 << 30, "max-postcopy-bandwidth": 0}

    def destination_args(self, ctx: RunContext) -> list[str]:
        return [a for ev in self.trace_events for a in ("-trace", ev)]

    async def switch_over(self, ctx: RunContext) -> None:
        # QEMU accepts migrate-start-postcopy as soon as the migration exists
        # (setup); with it set, the first iteration switches over, since RAM
        # is all postcopiable and nothing else must be pre-copied.
        assert ctx.src is not None
        if ctx.settings.postcopy_after_s:
            await ctx.src.wait_migration({"active", "postcopy-active", "completed"}, 60)
            await asyncio.sleep(ctx.settings.postcopy_after_s)
        await ctx.src.cmd("migrate-start-postcopy")


class PostcopyPreempt(Postcopy):
    """postcopy-ram with postcopy-preempt: urgent pages on a second channel (same port)."""

    name = "postcopy-preempt"
    title = "postcopy-ram + preempt"

    def capabilities(self) -> dict[str, bool]:
        return {**super().capabilities(), "postcopy-preempt": True}


MODES: dict[str, type[Mode]] = {m.name: m for m in (Precopy, Postcopy, PostcopyPreempt)}
