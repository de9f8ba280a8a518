"""umemd serve's release gate against a real QEMU (umemd.qmpwatch feeding
umemd.session): a STOP or a STOP/cont of any cause releases nothing; only
pre-switchover does; a cancel after that (the source guest runs again)
aborts."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from tests.harness.machine import Vm
from umemd.qmpwatch import watch_source
from umemd.session import SourceEvent, SourceGate, SourcePhase

RAM = 64 << 20


def ram_file(workdir: Path) -> Path:
    return Path("/dev/shm") / f"umem-gate-{os.getpid()}-{workdir.name}"


def source_args(workdir: Path) -> list[str]:
    ram = ram_file(workdir)
    return ["-object", f"memory-backend-file,id=ram0,size={RAM},mem-path={ram},share=on",
            "-machine", "memory-backend=ram0", "-m", f"{RAM >> 20}M",
            "-qmp", f"unix:{workdir / 'serve.qmp'},server=on,wait=off"]


async def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def gate_run(workdir: Path) -> SourceGate:
    gate = SourceGate()
    async with Vm(workdir, "src", source_args(workdir)) as src:
        watching = watch_source(workdir / "serve.qmp", gate)
        await until(watching.is_set, "the watcher to connect")
        await src.cmd("stop")
        await until(lambda: SourceEvent.STOPPED in gate.history, "the watcher to see the STOP")
        assert gate.phase is SourcePhase.HELD, "a plain STOP released the pages"
        await src.cmd("cont")
        await until(lambda: SourceEvent.RESUMED in gate.history, "the watcher to see the RESUME")
        assert gate.phase is SourcePhase.HELD
        caps = [{"capability": c, "state": True} for c in ("x-ignore-shared", "events", "pause-before-switchover")]
        await src.cmd("migrate-set-capabilities", capabilities=caps)
        await src.cmd("migrate", uri="exec:cat > /dev/null")
        await src.wait_migration({"pre-switchover"}, 120)
        await until(lambda: gate.released, "the release at pre-switchover")
        assert (await src.cmd("query-status"))["status"] != "running"
        await src.cmd("migrate_cancel")
        await until(lambda: gate.aborted, "the abort when the source guest runs again")
    return gate


def test_only_pre_switchover_releases_and_a_cancel_after_it_aborts(qemu: Path, workdir: Path) -> None:
    try:
        gate = asyncio.run(gate_run(workdir))
    finally:
        ram_file(workdir).unlink(missing_ok=True)
    assert gate.phase is SourcePhase.ABORTED
    assert gate.history.index(SourceEvent.PRE_SWITCHOVER) > gate.history.index(SourceEvent.RESUMED)
