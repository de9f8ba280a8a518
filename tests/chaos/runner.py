"""One chaos run: the e2e guest migrated by ``umemd migrate`` while a :class:`Plan`'s faults
are injected, then its outcome classified (tests/chaos/plan.py, tests/harness/chaos.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import CHECKOUT
from tests.harness.chaos import ChaosNet, ChaosSide, QmpRelay
from tests.harness.machine import GuestImage, Settings
from tests.harness.topology import HostVm, RemoteVm, Topology
from tests.harness.umem import booted_source
from umemd.cli import parse_size
from umemd.errors import ConnectError
from umemd.status import FINAL_PULL_STATES, first_status

from .plan import Fault, Kind, Outcome, Plan

PEER_TIMEOUT = 10.0     # both daemons: a 1-30 s cut is survived within it, or lost and made again
RELEASE_TIMEOUT = 60.0  # umemd migrate: longer than the longest cut plus a reconnect
SLOW_PUSH = "8"         # MiB/s: pages are still missing when the faults come
HELD_PUSH = "0.001"     # a refusal plan: the pull must still miss pages at the cancel


def deadline(settings: Settings, plan: Plan) -> float:
    """A run longer than this is a hang: a multiple of the configured timeouts."""
    faults = len(plan.faults) + (plan.terminal is not None)
    return 2 * (settings.boot_timeout + settings.verify_timeout + RELEASE_TIMEOUT) + 4 * PEER_TIMEOUT * faults


@dataclass
class Record:
    """What one run did and how it ended (a row of build/chaos/results.json)."""

    index: int
    seed: str
    faults: list[str]
    expect: str
    outcome: str = Outcome.UNEXPECTED.value
    detail: str = ""
    seconds: float = 0.0
    events: list[str] = field(default_factory=list)  # what the harness did, with times
    pull: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == self.expect


@dataclass
class Chaos:
    """A running migration and the handles the faults use."""

    side: ChaosSide
    src: HostVm
    dst: RemoteVm
    net: ChaosNet
    serve_relay: QmpRelay
    migrate_relay: QmpRelay
    serve_args: tuple[str, ...]
    record: Record
    started: float = field(default_factory=time.monotonic)
    migrate: asyncio.subprocess.Process | None = None
    migrate_killed: bool = False

    def note(self, what: str) -> None:
        self.record.events.append(f"{time.monotonic() - self.started:6.1f} s  {what}")

    async def pull_rc(self) -> int | None:
        rc = (await self.side.topo.agent.request("poll", name=self.side.pull_name))["returncode"]
        return None if rc is None else int(rc)

    async def status_until(self, until: Any) -> dict[str, Any] | None:
        """The pull's first status line satisfying ``until``; None once the pull has ended."""
        while True:
            try:
                doc = await first_status(self.side.status, 5, lambda d: until(d) or d["state"] in FINAL_PULL_STATES)
            except ConnectError:
                if await self.pull_rc() is not None:
                    return None
                continue
            return None if doc["state"] in FINAL_PULL_STATES and not until(doc) else doc

    async def link_up(self) -> None:
        """Until the pull's status says a page server's link is up."""
        await self.status_until(lambda d: d["state"] == "pulling" and not d.get("source_lost_since"))


async def run(topo: Topology, net: ChaosNet, guest: GuestImage, settings: Settings, workdir: Path, plan: Plan,
              record: Record) -> None:
    """Run ``plan``, filling ``record``; a run past its :func:`deadline` is a hang."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(_run(topo, net, guest, settings, workdir, plan, record), deadline(settings, plan))
    except TimeoutError:
        record.outcome, record.detail = Outcome.HANG.value, f"not done within {deadline(settings, plan):.0f} s"
    except Exception as e:
        record.outcome, record.detail = Outcome.UNEXPECTED.value, f"{type(e).__name__}: {e}"
    finally:
        record.seconds = round(time.monotonic() - started, 1)
        await net.reset()


async def _run(topo: Topology, net: ChaosNet, guest: GuestImage, settings: Settings, workdir: Path, plan: Plan,
               record: Record) -> None:
    name = f"chaos{record.index}"
    side = ChaosSide(topo, workdir, name, parse_size(settings.ram))
    side.daemon_args = ("--peer-timeout", str(PEER_TIMEOUT))
    serve_args = ("--max-push-rate", HELD_PUSH if plan.push_capped else SLOW_PUSH)
    async with (booted_source(topo, guest, settings, workdir, name, side) as (_, src, guest_args),
                QmpRelay(side.serve_monitor, side.serve_qmp) as serve_relay,
                QmpRelay(side.migrate_monitor, side.migrate_qmp) as migrate_relay):
        await side.start_pull()
        dst_args = ["-incoming", "defer", *guest_args, *side.destination_args()]
        async with topo.destination(f"dst-{name}", dst_args, workdir) as dst:
            side.start_serve(*serve_args)
            chaos = Chaos(side, src, dst, net, serve_relay, migrate_relay, serve_args, record)
            await _migrate(chaos, plan, settings)
            await _conclude(chaos, plan, settings)


async def _migrate(chaos: Chaos, plan: Plan, settings: Settings) -> None:
    """``umemd migrate`` beside the plan's faults, until both are through."""
    relay = chaos.migrate_relay
    if plan.terminal is not None:
        relay.hold(HELD_AT_COMMAND[plan.terminal.kind])
    else:
        relay.hold("migrate")  # the faults' clock starts when the source migrates
    argv = chaos.side.migrate_argv("--release-timeout", str(RELEASE_TIMEOUT), "--timeout",
                                   str(deadline(settings, plan)), "--report", str(chaos.side.workdir / "migrate.json"))
    log = (chaos.side.workdir / "migrate.log").open("wb")
    chaos.migrate = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=asyncio.subprocess.STDOUT,
                                                         cwd=CHECKOUT)
    log.close()
    chaos.note("umemd migrate started")
    injected = asyncio.create_task(_terminal(chaos, plan) if plan.terminal else _recoverable(chaos, plan))
    try:
        rc = await chaos.migrate.wait()
        chaos.note(f"umemd migrate exited {rc}")
        await injected
    finally:
        injected.cancel()
        if chaos.migrate.returncode is None:
            chaos.migrate.kill()
            await chaos.migrate.wait()


HELD_AT_COMMAND = {Kind.CANCEL_AT_PRE_SWITCHOVER: "migrate-continue",
                   Kind.MIGRATE_KILLED_AT_PRE_SWITCHOVER: "migrate-continue",
                   Kind.QMP_DROPPED_BEFORE_RELEASE: "migrate"}


async def _recoverable(chaos: Chaos, plan: Plan) -> None:
    await chaos.migrate_relay.reached("migrate")
    chaos.migrate_relay.release("migrate")
    chaos.note("the source migrates")
    for fault in plan.faults:
        await _inject(chaos, fault)


async def _terminal(chaos: Chaos, plan: Plan) -> None:
    assert plan.terminal is not None
    command = HELD_AT_COMMAND[plan.terminal.kind]
    await chaos.migrate_relay.reached(command)
    chaos.note(f"{command} held at the source's monitor")
    for fault in plan.faults:
        await _inject(chaos, fault)
    await chaos.link_up()
    await asyncio.sleep(plan.terminal.delay or 0)
    await TERMINAL_ACTS[plan.terminal.kind](chaos, plan.terminal)
    with contextlib.suppress(KeyError):  # a killed umemd migrate took its held command along
        chaos.migrate_relay.release(command)


async def _inject(chaos: Chaos, fault: Fault) -> None:
    if not await _moment(chaos, fault):
        chaos.note(f"skipped {fault.describe()}: the pull had finished")
        return
    chaos.note(f"inject {fault.describe()}")
    await FAULTS[fault.kind](chaos, fault)
    chaos.note(f"done {fault.kind.name.lower()}")


async def _moment(chaos: Chaos, fault: Fault) -> bool:
    """Wait for the fault's moment; False when the pull finished first."""
    if fault.kind is Kind.QMP_DROPPED_AFTER_RELEASE:
        if await chaos.status_until(lambda d: bool(d["source_released"])) is None:
            return False
    elif fault.kind is Kind.MIGRATE_KILLED_AFTER_RESUME:
        while chaos.dst.events.find("RESUME") is None:
            if chaos.migrate is None or chaos.migrate.returncode is not None:
                return False
            await asyncio.sleep(0.2)
    if fault.present is not None:
        share = fault.present
        return await chaos.status_until(lambda d: d["present"] >= share * d["pages"]) is not None
    await asyncio.sleep(fault.delay or 0)
    return await chaos.pull_rc() is None


async def _kill_serve(chaos: Chaos, fault: Fault) -> None:
    """SIGKILL serve; restart it as docs/operations.md §7 says: with --qmp while the source QEMU
    runs (its ``quit`` is held meanwhile, so it cannot quit under a serve that is connecting),
    with --guest-stopped-for-good once it has quit."""
    side = chaos.side
    assert side.serve_proc is not None
    if side.serve_proc.poll() is not None:
        chaos.note(f"serve had exited {side.serve_proc.returncode}: nothing to kill")
        return
    async with chaos.migrate_relay.holding("quit"):
        side.kill_serve()
        await asyncio.sleep(float(fault.params["down_s"]))
        if "quit" in chaos.migrate_relay.passed or chaos.src.proc is None or chaos.src.proc.poll() is not None:
            await side.source_quit()
            side.start_serve(*chaos.serve_args, stopped_for_good=True)
            chaos.note("serve restarted with --guest-stopped-for-good (the source QEMU has quit)")
            return
        side.start_serve(*chaos.serve_args)
        await _serve_watching(chaos)
        chaos.note("serve restarted with --qmp")


async def _serve_watching(chaos: Chaos) -> None:
    """Until the restarted serve has read the source's state (or exited)."""
    log = chaos.side.workdir / f"serve-{chaos.side.serves}.log"
    assert chaos.side.serve_proc is not None
    while "source QEMU at" not in log.read_text(errors="replace") and chaos.side.serve_proc.poll() is None:
        await asyncio.sleep(0.2)


async def _kill_pull(chaos: Chaos, fault: Fault) -> None:
    agent, name = chaos.side.topo.agent, chaos.side.pull_name
    if await chaos.pull_rc() is not None:
        return
    await agent.request("signal", name=name, signum=int(signal.SIGKILL))
    rc = (await agent.request("stop", name=name, grace=10))["returncode"]
    if rc == 0:  # it had finished on its own: its instance is gone, a new pull would make another
        chaos.note("the pull had finished before the kill")
        return
    await asyncio.sleep(float(fault.params["down_s"]))
    await chaos.side.start_pull()
    chaos.note(f"pull restarted ({chaos.side.pull_name})")


async def _link_down(chaos: Chaos, fault: Fault) -> None:
    await chaos.net.link(False)
    await asyncio.sleep(float(fault.params["down_s"]))
    await chaos.net.link(True)


async def _netem(chaos: Chaos, fault: Fault) -> None:
    await chaos.net.netem(fault.netem_spec)
    await asyncio.sleep(float(fault.params["for_s"]))
    await chaos.net.netem(None)


async def _drop_serve_qmp(chaos: Chaos, fault: Fault) -> None:
    chaos.serve_relay.drop()
    chaos.note("serve's QMP monitor dropped")


async def _kill_migrate(chaos: Chaos, fault: Fault) -> None:
    assert chaos.migrate is not None
    if chaos.migrate.returncode is None:
        chaos.migrate.send_signal(signal.SIGKILL)
        chaos.migrate_killed = True


async def _cancel(chaos: Chaos, fault: Fault) -> None:
    await chaos.src.cmd("migrate_cancel")
    chaos.note("migrate_cancel on the source")


async def _kill_migrate_then_operator(chaos: Chaos, fault: Fault) -> None:
    """umemd migrate dies with the source paused at pre-switchover, released; the operator then
    cancels (the source guest runs on) or continues by hand, as docs/operations.md §7 says."""
    await _kill_migrate(chaos, fault)
    chaos.note("umemd migrate SIGKILLed")
    if fault.params["operator"] == "cancel":
        await _cancel(chaos, fault)
    else:
        await chaos.src.cmd("migrate-continue", state="pre-switchover")
        chaos.note("migrate-continue by hand")


async def _drop_before_release(chaos: Chaos, fault: Fault) -> None:
    await _drop_serve_qmp(chaos, fault)
    assert chaos.side.serve_proc is not None
    rc = await asyncio.to_thread(chaos.side.serve_proc.wait, 6 * PEER_TIMEOUT)
    chaos.note(f"serve exited {rc}")


FAULTS = {Kind.SERVE_KILLED: _kill_serve, Kind.PULL_KILLED: _kill_pull, Kind.LINK_DOWN: _link_down,
          Kind.NETEM: _netem, Kind.QMP_DROPPED_AFTER_RELEASE: _drop_serve_qmp,
          Kind.MIGRATE_KILLED_AFTER_RESUME: _kill_migrate}
TERMINAL_ACTS = {Kind.CANCEL_AT_PRE_SWITCHOVER: _cancel,
                 Kind.MIGRATE_KILLED_AT_PRE_SWITCHOVER: _kill_migrate_then_operator,
                 Kind.QMP_DROPPED_BEFORE_RELEASE: _drop_before_release}


# ---- the outcome -------------------------------------------------------------------


async def _conclude(chaos: Chaos, plan: Plan, settings: Settings) -> None:
    side, record = chaos.side, chaos.record
    pull_rc = await side.wait_pull(deadline(settings, plan))
    report = await side.pull_report()
    record.pull = {k: report.get(k) for k in ("state", "pages", "present", "reconnects", "attached", "seconds")}
    aborted = report.get("state") == "aborted"
    assert side.serve_proc is not None
    serve_rc = await asyncio.to_thread(side.serve_proc.wait, 6 * PEER_TIMEOUT)
    chaos.note(f"pull exited {pull_rc}{' (aborted)' if aborted else ''}, serve exited {serve_rc}")
    if pull_rc == 0:
        await _verified(chaos, settings)
    else:
        await _refused(chaos, settings, pull_rc if aborted else -1, serve_rc)


def _bad(log: Any) -> int:
    return int(log.total_bad + len(log.bad) + len(log.errors))


async def _verified(chaos: Chaos, settings: Settings) -> None:
    record, dst = chaos.record, chaos.dst
    await asyncio.sleep(1.0)  # the serial stream catches up
    base = len(dst.workload().verifies)
    log = await dst.wait_serial(lambda log: len(log.verifies) >= base + settings.passes_after,
                                settings.verify_timeout, "verification passes after the last page")
    bad = _bad(log) + _bad(chaos.src.workload())
    status = (await dst.cmd("query-status"))["status"]
    chaos.note(f"destination {status}: {len(log.verifies) - base} passes after the last page, {bad} bad")
    if bad:
        record.outcome, record.detail = Outcome.WRONG_PAGE.value, f"{bad} bad pages or errors in the guest's log"
    elif status != "running":
        record.outcome, record.detail = Outcome.UNEXPECTED.value, f"the destination guest is {status}"
    elif chaos.migrate is not None and chaos.migrate.returncode and not chaos.migrate_killed:
        record.outcome = Outcome.UNEXPECTED.value
        record.detail = f"the guest verified, but umemd migrate exited {chaos.migrate.returncode}"
    else:
        record.outcome = Outcome.VERIFIED.value


async def _refused(chaos: Chaos, settings: Settings, pull_rc: int, serve_rc: int) -> None:
    """The refusal docs/protocol.md promises: serve exits 1 "migration aborted", the pull exits 1
    ``aborted`` (``pull_rc`` is -1 if its report says otherwise), and the source guest runs on, its
    memory verified again."""
    record, src = chaos.record, chaos.src
    serve_log = (chaos.side.workdir / f"serve-{chaos.side.serves}.log").read_text(errors="replace")
    base = len(src.workload().verifies)
    log = await src.wait_serial(lambda log: len(log.verifies) > base, settings.verify_timeout,
                                "a verification pass of the source guest after the refusal")
    status = (await src.cmd("query-status"))["status"]
    chaos.note(f"source guest {status}, verified again")
    if _bad(log):
        record.outcome, record.detail = Outcome.WRONG_PAGE.value, f"{_bad(log)} bad pages in the source guest"
    elif (pull_rc, serve_rc, status) != (1, 1, "running") or "migration aborted" not in serve_log:
        record.outcome = Outcome.UNEXPECTED.value
        record.detail = f"pull exited {pull_rc} (-1: not aborted), serve {serve_rc}, source guest {status}"
    else:
        record.outcome = Outcome.REFUSED.value
