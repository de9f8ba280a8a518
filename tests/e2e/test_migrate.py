"""A real post-copy migration with umem: the guest runs on the destination at
once, its RAM follows through umemd, and every page it verifies is right."""

from __future__ import annotations

from pathlib import Path

from bench.modes import Settings
from bench.umem import migrate_guest
from tests.qemu.harness import GuestImage

from .conftest import Driver


def test_guest_runs_on_the_destination_while_its_ram_follows(vm: Driver, guest: GuestImage, settings: Settings,
                                                              workdir: Path) -> None:
    result = vm.run(migrate_guest(vm.topo, guest, settings, workdir, plot=workdir / "migration.png"))
    report = result.report
    # Guest RAM is not on the migration stream: device state and a few small ROM blocks only.
    assert result.dst_query["status"] == "completed"
    assert report["qemu"]["ram_bytes"] < 4 << 20, report["qemu"]
    # The guest ran on the destination and faulted its pages through the daemon.
    assert report["pages"]["faults"] > 0
    assert report["pages"]["present"] == report["pages"]["total"]
    assert report["stop_resume_ms"] is not None
    assert len(result.dst_log.heartbeats) > 0, "no heartbeat from the guest on the destination"
    assert result.verify_failures == 0, result.verdict()
    assert result.passes_after >= 1
    assert (workdir / "migration.png").stat().st_size > 10_000
