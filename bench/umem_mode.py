"""umem as the fourth mode of the race (``make bench-e2e``): its daemons around the
same migration the upstream modes run (bench/run.py), through tests/harness/umem.py."""

from __future__ import annotations

from typing import Any

from tests.harness.topology import ClockSample
from tests.harness.umem import PORTS, UmemSide, insmod_on
from umemd.cli import parse_size
from umemd.status import first_status

from .metrics import daemon_requests
from .modes import Mode, RunContext


class UmemMode(Mode):
    """umem: the destination's RAM is /dev/umem/<name>, umemd moves it (the fourth column).

    The pull daemon and the page server start before the destination QEMU
    (``-postcopy`` refuses a node that does not exist); the page server holds
    its pages until the source reaches pre-switchover, and the switch-over
    continues once the pull says it released, as with ``umemd migrate``. QEMU migrates device state only, so its
    own ``total-time`` ends long before the last page: the total here runs from
    ``migrate`` to the pull's last fill, and the latency rows come from the
    pull's per-fault log (fault record read → page filled, the same span as
    upstream's fault-thread read → page placed).
    """

    name = "umem"
    title = "umem"
    postcopy = True
    extra_ports = PORTS

    def _side(self, ctx: RunContext) -> UmemSide:
        side = ctx.extra.get("umem")
        if side is None:
            side = ctx.extra["umem"] = UmemSide(ctx.topo, ctx.workdir, "bench", parse_size(ctx.settings.ram))
        assert isinstance(side, UmemSide)
        return side

    def source_args(self, ctx: RunContext) -> list[str]:
        return self._side(ctx).source_args()

    def destination_args(self, ctx: RunContext) -> list[str]:
        return self._side(ctx).destination_args()

    async def before_destination(self, ctx: RunContext) -> None:
        side = self._side(ctx)
        await insmod_on(ctx.topo)
        await side.start_pull(latency_log=True)
        side.start_serve()

    async def before_incoming(self, ctx: RunContext) -> None:
        assert ctx.src is not None
        caps = [{"capability": c, "state": True} for c in ("events", "pause-before-switchover")]
        await ctx.src.cmd("migrate-set-capabilities", capabilities=caps)

    async def switch_over(self, ctx: RunContext) -> None:
        """As ``umemd migrate`` does: ``migrate-continue`` once the pull says the page server released."""
        assert ctx.src is not None
        await ctx.src.wait_migration({"pre-switchover"}, ctx.settings.migrate_timeout)
        await first_status(self._side(ctx).status, 120, lambda doc: bool(doc["source_released"]))
        await ctx.src.cmd("migrate-continue", state="pre-switchover")

    async def after_completed(self, ctx: RunContext) -> None:
        rc = await self._side(ctx).wait_pull(ctx.settings.migrate_timeout)
        if rc:
            raise RuntimeError(f"umemd pull exited {rc}: see {ctx.workdir}/pull-1.log")

    async def collect(self, ctx: RunContext) -> dict[str, Any]:
        side = self._side(ctx)
        report = await side.pull_report()
        log = (await ctx.topo.agent.read_file(side.latency_log_path)).decode()
        (ctx.workdir / "latency.log").write_text(log)
        assert ctx.dst is not None
        resume = ctx.dst.events.find("RESUME")
        requests = daemon_requests(log, report["faults"], resume[1] if resume else None)
        clock: ClockSample = ctx.extra["clock_before"]
        finished_host_ns = report["finished_unix"] * 1e9 - clock.offset_ns
        assert ctx.src is not None
        ram = (await ctx.src.cmd("query-migrate")).get("ram", {})
        return {"pull": report, "overrides": {
            "total_ms": round((finished_host_ns - ctx.extra["migrate_unix_ns"]) / 1e6),
            "page_requests": requests.to_dict(),
            # every page travels on umem's channels after the switch-over
            "bytes": report["bytes_received"] + ram.get("transferred", 0),
            "ram": {**ram, "postcopy-bytes": report["bytes_received"]}}}

    async def cleanup(self, ctx: RunContext) -> None:
        await self._side(ctx).stop()
