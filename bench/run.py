"""One migration of the test guest, in any topology and mode, and its numbers.

1. Boot the source on the host (the test guest, ``wl_mib`` of workload) and
   wait for its first verification pass.
2. Start a fresh destination through the topology's agent with ``-incoming
   defer``, the same guest arguments (the same ROMs and RAM blocks) and the
   mode's own; connect to its QMP and serial console.
3. Capabilities on both sides and source parameters, *then*
   ``migrate-incoming`` (postcopy-preempt needs the capability before the
   listener exists); a clock sample; ``migrate``; the mode's switch-over.
   A destination under another accelerator (KVM in the test VM) gets the
   guest of :func:`~tests.harness.machine.migration_guest_args` on both sides.
4. Wait for ``completed`` on both sides (pre-copy: at most ``precopy_cap_s``,
   then it is cancelled and recorded as not converged), then for ``passes_after``
   verification passes on the destination that begin after completion (every
   page is there by then), another clock sample, ``query-migrate`` on both.
5. Quit both; fetch the destination's trace log; compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from tests.harness.machine import GuestImage, MigrationTimeout, Settings, WorkloadLog, migration_guest_args
from tests.harness.topology import HostVm, Topology

from .metrics import event_interval, heartbeat_gaps, page_requests, qemu_latency
from .modes import Mode, RunContext


def _ram(info: dict[str, Any]) -> dict[str, Any]:
    ram = info.get("ram", {})
    keys = ("transferred", "precopy-bytes", "downtime-bytes", "postcopy-bytes", "postcopy-requests",
            "normal", "duplicate", "mbps", "dirty-sync-count", "total")
    return {k: ram[k] for k in keys if k in ram}


async def run_once(topo: Topology, mode: Mode, guest: GuestImage, settings: Settings, index: int,
                   workdir: Path) -> dict[str, Any]:
    """Run one migration; return its record (``ok`` False with ``error`` if it failed)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(topo, mode, guest, settings, index, workdir)
    record: dict[str, Any] = {"mode": mode.name, "index": index, "ok": False,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg": os.getloadavg()}
    t0 = time.monotonic()
    try:
        await asyncio.wait_for(_migrate(ctx, record), settings.boot_timeout + settings.migrate_timeout
                               + settings.verify_timeout + 120)
        record["ok"] = not record.get("problems")
    except Exception as e:
        record["error"] = f"{type(e).__name__}: {e}"
    finally:
        with contextlib.suppress(Exception):
            await mode.cleanup(ctx)
    record["seconds"] = round(time.monotonic() - t0, 1)
    (workdir / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


async def _migrate(ctx: RunContext, record: dict[str, Any]) -> None:
    mode, s, topo = ctx.mode, ctx.settings, ctx.topo
    guest_args = migration_guest_args(ctx.guest, s, topo.dst_accel)
    trace_log = topo.remote_path(f"{ctx.tag}.trace") if mode.trace_events else None
    async with HostVm(ctx.workdir, "src", [*guest_args, *mode.source_args(ctx)]) as src:
        ctx.src = src
        await src.wait_serial(lambda log: len(log.verifies) >= 1, s.boot_timeout, "first verification pass")
        await mode.before_destination(ctx)
        dst_args = ["-incoming", "defer", *guest_args, *mode.destination_args(ctx)]
        async with topo.destination(f"dst-{ctx.tag}", dst_args, ctx.workdir, trace_log) as dst:
            ctx.dst = dst
            record["dst_accel"] = dst.accel
            caps = [{"capability": k, "state": v} for k, v in mode.capabilities().items()]
            for vm in (src, dst):
                await vm.cmd("migrate-set-capabilities", capabilities=caps)
            params = mode.source_parameters(s)
            if params:
                await src.cmd("migrate-set-parameters", **params)
            await mode.before_incoming(ctx)
            clock_before = ctx.extra["clock_before"] = await topo.agent.clock()
            await dst.cmd("migrate-incoming", uri=f"tcp:{topo.bind}:{topo.guest_port('migration')}")
            t_start = time.monotonic()
            ctx.extra["migrate_unix_ns"] = time.time_ns()
            await src.cmd("migrate", uri=f"tcp:127.0.0.1:{topo.host_port('migration')}")
            await mode.switch_over(ctx)
            try:
                src_info = await src.wait_migration({"completed"}, s.migrate_timeout if mode.postcopy
                                                    else s.precopy_cap_s)
            except MigrationTimeout:
                if mode.postcopy:
                    raise
                record.update(await not_converged(src, s))
                return
            record["converged"] = True
            t_src_done = time.monotonic()
            await dst.wait_migration({"completed"}, 120)
            await mode.after_completed(ctx)
            t_dst_done = time.monotonic()
            # Passes that start after completion: the count is taken once the
            # serial stream has caught up, and the last required pass begins
            # after the previous one ended, so after this point.
            await asyncio.sleep(1.0)
            base = len(dst.workload().verifies)
            await dst.wait_serial(lambda log: len(log.verifies) >= base + s.passes_after, s.verify_timeout,
                                  f"{s.passes_after} verification passes after completion")
            clock_after = await topo.agent.clock()
            dst_info = await dst.cmd("query-migrate")
            src_info = await src.cmd("query-migrate")
            status = (await dst.cmd("query-status"))["status"]
            record["mode_extra"] = await mode.collect(ctx)
            dst_log, src_log = dst.workload(), src.workload()
            record["events"] = {"src": src.events.dump(), "dst": dst.events.dump()}
        trace = await dst.fetch_trace() if trace_log else ""
        if trace:
            (ctx.workdir / "dst.trace").write_text(trace)

    record.update(measure(record, src_info, dst_info, src, dst, src_log, dst_log, trace,
                          clock_before, clock_after, status, base))
    record.update(record["mode_extra"].pop("overrides", {}))
    record["wall_s"] = {"src_completed": round(t_src_done - t_start, 3),
                        "dst_completed": round(t_dst_done - t_start, 3)}


async def not_converged(src: Any, s: Settings) -> dict[str, Any]:
    """Cancel a pre-copy past its cap; what it had moved, and the source's verification."""
    info = await src.cmd("query-migrate")
    await src.cmd("migrate_cancel")
    await src.wait_migration({"cancelled"}, 120)
    log = src.workload()
    failures = log.total_bad + len(log.errors)
    return {"converged": False, "precopy_cap_s": s.precopy_cap_s, "bytes": info.get("ram", {}).get("transferred"),
            "ram": _ram(info), "verify": {"src_passes": len(log.verifies), "src_bad": log.total_bad,
                                          "bad_lines": log.bad[:20], "errors": log.errors},
            "verify_failures": failures, "problems": [f"verification failures on the source: {failures}"]
            if failures or log.bad else []}


def measure(record: dict[str, Any], src_info: dict[str, Any], dst_info: dict[str, Any], src: Any, dst: Any,
            src_log: WorkloadLog, dst_log: WorkloadLog, trace: str, clock_before: Any, clock_after: Any,
            status: str, verifies_at_completion: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    problems: list[str] = []
    out["total_ms"] = src_info.get("total-time")
    out["src_downtime_ms"] = src_info.get("downtime")
    out["src_setup_ms"] = src_info.get("setup-time")
    out["ram"] = _ram(src_info)
    out["bytes"] = src_info.get("ram", {}).get("transferred")
    out["blocktime_ms"] = dst_info.get("postcopy-blocktime")
    out["vcpu_blocktime_ms"] = dst_info.get("postcopy-vcpu-blocktime")
    out["qemu_latency"] = qemu_latency(dst_info)
    out["clock"] = {"before": clock_before.__dict__, "after": clock_after.__dict__}

    stop, resume = src.events.find("STOP"), dst.events.find("RESUME")
    if stop and resume:
        iv = event_interval(stop[1], resume[1], clock_before, clock_after)
        out["stop_resume_ms"] = iv["ms"]
        out["stop_resume"] = {**iv, "arrival_ms": (resume[0] - stop[0]) / 1e6}
    else:
        out["stop_resume_ms"] = None
        problems.append(f"missing events: STOP={bool(stop)} RESUME={bool(resume)}")

    out["heartbeats"] = heartbeat_gaps(src_log, dst_log).to_dict()
    out["max_hb_gap_ms"] = out["heartbeats"]["max_gap_ms"]
    if trace:
        out["page_requests"] = page_requests(trace, resume[1] if resume else None).to_dict()

    bad = src_log.total_bad + dst_log.total_bad
    out["verify"] = {
        "src_passes": len(src_log.verifies), "dst_passes": len(dst_log.verifies),
        "dst_passes_after_completion": len(dst_log.verifies) - verifies_at_completion,
        "src_bad": src_log.total_bad, "dst_bad": dst_log.total_bad,
        "bad_lines": (src_log.bad + dst_log.bad)[:20], "errors": src_log.errors + dst_log.errors,
    }
    out["verify_failures"] = bad + len(src_log.errors) + len(dst_log.errors)
    if out["verify_failures"] or src_log.bad or dst_log.bad:
        problems.append(f"verification failures: {out['verify']}")
    if status != "running":
        problems.append(f"destination is {status!r} after the migration")
    if not dst_log.heartbeats:
        problems.append("no heartbeat on the destination")
    out["problems"] = problems
    return out
