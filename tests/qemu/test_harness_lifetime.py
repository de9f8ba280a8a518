"""The harness's host-side children die with the driver that started them: a source QEMU left
running by a driver killed mid-run (SIGKILL, a CI timeout, an operator's pkill) would spin a
TCG guest on one of the machine's two cores until someone noticed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.harness import CHECKOUT
from tests.harness.waiting import wait_until

DRIVER = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from tests.harness.machine import Vm

    async def main() -> None:
        async with Vm(Path(sys.argv[1]), "orphan", ["-m", "64M"]) as vm:
            print(vm.proc.pid, flush=True)
            await asyncio.sleep(3600)

    asyncio.run(main())
""")


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_source_qemu_exits_when_its_driver_is_killed(qemu: Path, workdir: Path) -> None:
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(workdir)], cwd=CHECKOUT, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(CHECKOUT)})
    assert driver.stdout is not None
    line = driver.stdout.readline()
    assert line, f"the driver exited {driver.wait()} before starting QEMU"
    pid = int(line)
    assert alive(pid)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    try:
        wait_until(lambda: not alive(pid), 60, "the orphaned QEMU to exit")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
