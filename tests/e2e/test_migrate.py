"""A real post-copy migration with umem: the guest runs on the destination at
once, its RAM follows through umemd, and every page it verifies is right."""

from __future__ import annotations

from pathlib import Path

from tests.harness.driver import Driver
from tests.harness.machine import GuestImage, Settings
from tests.harness.umem import MigrationResult, UmemSide, migrate_guest, wait_partly_present

SLOW_PUSH = ("--max-push-rate", "8")  # MiB/s: pages are still missing when the fault is injected


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


def recovered(result: MigrationResult) -> None:
    assert result.report["pages"]["present"] == result.report["pages"]["total"]
    assert result.dst_status == "running"
    assert result.verify_failures == 0, result.verdict()
    assert result.passes_after >= 1


def test_page_server_killed_and_restarted(vm: Driver, guest: GuestImage, settings: Settings, workdir: Path) -> None:
    seen: dict[str, object] = {}

    async def kill_and_restart_serve(side: UmemSide) -> None:
        seen["status"] = await wait_partly_present(side)
        side.kill_serve()
        seen["pages missing"] = await side.missing_pages()
        await side.source_quit()  # umemd migrate quits it once the destination guest runs
        side.start_serve(*SLOW_PUSH, stopped_for_good=True)  # the operator's word: it cannot run again

    result = vm.run(migrate_guest(vm.topo, guest, settings, workdir, serve_args=SLOW_PUSH,
                                  inject=kill_and_restart_serve))
    assert seen["pages missing"], seen
    recovered(result)
    assert result.report["reconnects"] >= 1


def test_pull_killed_and_restarted(vm: Driver, guest: GuestImage, settings: Settings, workdir: Path) -> None:
    seen: dict[str, object] = {}

    async def kill_and_restart_pull(side: UmemSide) -> None:
        seen["status"] = await wait_partly_present(side)
        await side.kill_pull()
        seen["pages missing"] = await side.missing_pages()
        seen["restarted"] = await side.start_pull()

    result = vm.run(migrate_guest(vm.topo, guest, settings, workdir, serve_args=SLOW_PUSH,
                                  inject=kill_and_restart_pull))
    assert seen["pages missing"], seen
    assert result.report["daemon_attached"], "the restarted pull did not attach to the instance"
    recovered(result)
