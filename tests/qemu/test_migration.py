"""The patched QEMU still migrates the test guest host to host over loopback.

Each test boots the guest on a source QEMU, waits until its workload has
filled memory and verified it once, migrates it to a destination QEMU on the
same host over TCP on 127.0.0.1, lets the destination run a few more
verification passes and then requires zero bad pages on both sides. Modes:

- plain pre-copy (no capability);
- upstream post-copy (``postcopy-ram``, switched with ``migrate-start-postcopy``);
- ``x-ignore-shared`` set from the command line (``-postcopy`` on the source,
  ``-global`` on the destination), both mapping the same shared file: the
  stream carries only device state, the way umem runs but with the file in
  place of the device.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.harness.machine import GuestImage, Vm, WorkloadLog
from tests.harness.net import free_port

MIB = 192           # workload size (the default)
RAM = "512M"        # guest RAM
PASSES_AFTER = 3    # verification passes required on the destination
PRECOPY_PARAMS = {"downtime-limit": 2000, "max-bandwidth": 4 << 30}
POSTCOPY_PARAMS = {"max-bandwidth": 16 << 20}


def guest_args(guest: GuestImage, ram: list[str] | None = None) -> list[str]:
    return [*(ram or ["-m", RAM]), *guest.args(mib=MIB)]


async def migrate(workdir: Path, guest: GuestImage, *, src_args: list[str], dst_args: list[str],
                  caps: dict[str, bool], postcopy: bool = False) -> tuple[dict[str, Any], WorkloadLog, WorkloadLog]:
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    async with Vm(workdir, "src", [*src_args, *guest_args(guest)]) as src:
        filled = await src.wait_serial(lambda log: len(log.verifies) >= 1, 120, "first verification pass")
        assert filled.total_bad == 0, filled.bad
        async with Vm(workdir, "dst", ["-incoming", "defer", *dst_args, *guest_args(guest)]) as dst:
            if caps:
                cap_list = [{"capability": k, "state": v} for k, v in caps.items()]
                for vm in (src, dst):
                    await vm.cmd("migrate-set-capabilities", capabilities=cap_list)
            # Post-copy: slow pre-copy, so most pages are left for post-copy.
            # Pre-copy: it must converge while the guest rewrites its hot part.
            params = POSTCOPY_PARAMS if postcopy else PRECOPY_PARAMS
            await src.cmd("migrate-set-parameters", **params)
            await dst.cmd("migrate-incoming", uri=uri)
            await src.cmd("migrate", uri=uri)
            if postcopy:
                await src.wait_migration({"active"}, 60)
                await asyncio.sleep(0.5)  # some pre-copy first, as users do
                await src.cmd("migrate-start-postcopy")
                await src.wait_migration({"postcopy-active", "completed"}, 60)
            info = await src.wait_migration({"completed"}, 300)
            await dst.wait_migration({"completed"}, 60)
            status = await dst.cmd("query-status")
            assert status["status"] == "running", status
            before = len(dst.workload().verifies)
            dst_log = await dst.wait_serial(lambda log: len(log.verifies) >= before + PASSES_AFTER, 180,
                                            f"{PASSES_AFTER} verification passes on the destination")
            src_log = src.workload()
    return info, src_log, dst_log


def check_no_corruption(src_log: WorkloadLog, dst_log: WorkloadLog) -> None:
    assert not src_log.bad and not dst_log.bad, src_log.bad + dst_log.bad
    assert src_log.total_bad == 0 and dst_log.total_bad == 0
    assert not src_log.errors and not dst_log.errors
    # The destination continues the source's guest: its heartbeats carry on.
    assert dst_log.heartbeats, "no heartbeat on the destination"
    assert src_log.heartbeats[-1][0] < dst_log.heartbeats[-1][0]


def test_precopy(workdir: Path, guest: GuestImage) -> None:
    info, src_log, dst_log = asyncio.run(migrate(workdir, guest, src_args=[], dst_args=[], caps={}))
    check_no_corruption(src_log, dst_log)
    assert info["ram"]["transferred"] > MIB << 20, "pre-copy did not send the guest's memory"


def test_postcopy_ram(workdir: Path, guest: GuestImage) -> None:
    info, src_log, dst_log = asyncio.run(migrate(workdir, guest, src_args=[], dst_args=[],
                                                 caps={"postcopy-ram": True}, postcopy=True))
    check_no_corruption(src_log, dst_log)
    # The guest touched pages that had not arrived yet: real post-copy faults.
    assert info["ram"]["postcopy-requests"] > 0, info["ram"]


def test_ignore_shared_from_the_command_line(workdir: Path, guest: GuestImage) -> None:
    ram = Path("/dev/shm") / f"umem-test-{workdir.name}"
    mem = ["-object", f"memory-backend-file,id=ram0,size={RAM},mem-path={ram},share=on",
           "-machine", "memory-backend=ram0"]
    try:
        info, src_log, dst_log = asyncio.run(migrate(
            workdir, guest, src_args=["-postcopy", *mem],
            dst_args=["-global", "migration.x-ignore-shared=on", *mem], caps={}))
    finally:
        ram.unlink(missing_ok=True)
    check_no_corruption(src_log, dst_log)
    # Only device state and small ROM blocks travel: far less than the guest's RAM.
    assert info["ram"]["transferred"] < 8 << 20, info["ram"]
