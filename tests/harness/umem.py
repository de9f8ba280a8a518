"""umem in the end-to-end topology: the two daemons and the QEMU arguments
around one migration, for ``make demo``, the e2e tests and ``make bench-e2e``.

Where everything runs (BRIEF §5, tests/harness/topology.py):

- host (source): the source QEMU, its RAM a shared file in /dev/shm, with
  ``-postcopy`` and two extra QMP sockets (one for ``umemd serve --qmp``, one
  for ``umemd migrate``); ``umemd serve`` connecting to the page channel's
  forward; ``umemd migrate``;
- test VM (destination): umem.ko (``insmod`` through the agent), ``umemd
  pull`` listening on the page channel with its status endpoint, and the
  destination QEMU mapping ``/dev/umem/<name>`` with ``-postcopy``, a QMP
  port for ``umemd migrate`` besides the harness's own.

Every connection goes from the host into the VM through slirp forwards:

==============  ==========  ============================================
name            guest port  what
==============  ==========  ============================================
umem-page       4447        ``umemd pull --listen``: demand and push channels
umem-status     4448        ``umemd pull --status``
umem-qmp        4449        the destination QEMU's second QMP (``umemd migrate``)
==============  ==========  ============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.harness import CHECKOUT
from tests.harness.command import VENV_PYTHON, umemd_command
from tests.harness.kmod import KMOD
from tests.harness.machine import GuestImage, Settings, WorkloadLog, die_with_driver, migration_guest_args
from tests.harness.topology import HostVm, Topology
from umemd.cli import parse_size
from umemd.protocol import PAGE_SIZE
from umemd.status import PullState, first_status, read_status
from umemd.transport import Endpoint

PORTS = {"umem-page": 4447, "umem-status": 4448, "umem-qmp": 4449}
OUTPUT_CHUNK = 1 << 12  # bytes of umemd migrate's output read (and echoed) at once
PROFILE = os.environ.get("UMEM_BENCH_PROFILE") == "1"  # run pull under py-spy (make bench-e2e-profile)


async def insmod_on(topo: Topology) -> None:
    """insmod umem.ko on the destination side, once."""
    reply = await topo.agent.request("run", argv=["sh", "-c", f"test -e /dev/umem/control || insmod {KMOD}"])
    if reply["returncode"]:
        raise RuntimeError(f"insmod {KMOD} on the destination failed: {reply['output']}")


@dataclass
class UmemSide:
    """The daemons and QEMU arguments of one umem migration (one instance name)."""

    topo: Topology
    workdir: Path                # host side; inside the checkout, so the VM sees it too
    name: str
    ram_bytes: int
    key: Path = field(init=False)
    migration_id: str = field(init=False)  # both daemons of this migration, restarts included
    ram_file: Path = field(init=False)
    serve_proc: subprocess.Popen[bytes] | None = None
    pulls: int = 0
    serves: int = 0
    daemon_args: tuple[str, ...] = ()  # for both daemons (e.g. --peer-timeout)
    pull_netns: str | None = None      # the network namespace the pull runs in

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key = self.workdir / "umem.key"
        self.key.write_text(secrets.token_hex(32) + "\n")
        self.key.chmod(0o600)  # umemd refuses a key others can read
        self.migration_id = secrets.token_hex(16)
        self.ram_file = Path("/dev/shm") / f"umem-{self.name}-{os.getpid()}"

    # ---- QEMU arguments ----------------------------------------------------------

    def source_args(self) -> list[str]:
        return ["-postcopy",
                "-object", f"memory-backend-file,id=ram0,size={self.ram_bytes},mem-path={self.ram_file},share=on",
                "-machine", "memory-backend=ram0",
                "-qmp", f"unix:{self.serve_qmp},server=on,wait=off",
                "-qmp", f"unix:{self.migrate_qmp},server=on,wait=off"]

    def destination_args(self) -> list[str]:
        return ["-postcopy",
                "-object", f"memory-backend-file,id=ram0,size={self.ram_bytes},mem-path={self.node},share=on,"
                           "postcopy-device=on",
                "-machine", "memory-backend=ram0",
                "-qmp", f"tcp:{self.topo.bind}:{self.topo.guest_port('umem-qmp')},server=on,wait=off"]

    @property
    def node(self) -> str:
        return f"/dev/umem/{self.name}"

    @property
    def serve_qmp(self) -> Path:
        return self.workdir / "src-serve.qmp"

    @property
    def migrate_qmp(self) -> Path:
        return self.workdir / "src-migrate.qmp"

    @property
    def serve_monitor(self) -> Path:
        """The QMP socket ``umemd serve --qmp`` connects to (the source QEMU's own, unless relayed)."""
        return self.serve_qmp

    @property
    def migrate_monitor(self) -> Path:
        """The QMP socket ``umemd migrate --src-qmp`` connects to."""
        return self.migrate_qmp

    @property
    def status(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.topo.host_port("umem-status"))

    @property
    def pull_name(self) -> str:
        return f"{self.name}-pull-{self.pulls}"

    @property
    def latency_log_path(self) -> str:
        return self.topo.remote_path(f"{self.name}-pull-{self.pulls}.latency")

    @property
    def pull_report_path(self) -> str:
        return self.topo.remote_path(f"{self.name}-pull-{self.pulls}.json")

    # ---- the daemons -------------------------------------------------------------

    async def start_pull(self, ready_timeout: float = 120, latency_log: bool = False) -> dict[str, Any]:
        """Start (or restart) ``umemd pull`` in the VM; return its first status line."""
        self.pulls += 1
        bind = self.topo.bind
        extra = ["--latency-log", self.latency_log_path] if latency_log else []
        argv = umemd_command("pull", self.name, "--size", str(self.ram_bytes),
                             "--listen", f"{bind}:{self.topo.guest_port('umem-page')}", "--key-file", str(self.key),
                             "--migration-id", self.migration_id,
                             "--status", f"{bind}:{self.topo.guest_port('umem-status')}",
                             "--report", self.pull_report_path, *self.daemon_args, *extra,
                             python=VENV_PYTHON, verbose=True, netns=self.pull_netns)
        if PROFILE:  # where the pull's time goes: py-spy's folded stacks, every thread, idle included
            argv = [str(VENV_PYTHON.parent / "py-spy"), "record", "--format", "raw", "--idle", "--threads",
                    "--rate", "250", "--output", str(self.workdir / f"pull-{self.pulls}.profile"), "--", *argv]
        await self.topo.agent.request("spawn", name=self.pull_name, cwd=str(CHECKOUT), argv=argv)
        return await first_status(self.status, ready_timeout)

    async def kill_pull(self) -> None:
        """SIGKILL the running pull (the instance and its missing pages stay)."""
        await self.topo.agent.request("signal", name=self.pull_name, signum=int(signal.SIGKILL))
        await self.topo.agent.request("stop", name=self.pull_name, grace=10)

    def start_serve(self, *extra: str, stopped_for_good: bool = False) -> subprocess.Popen[bytes]:
        """Start (or restart) ``umemd serve`` on the host; it holds pages until the source reaches
        pre-switchover, or, ``stopped_for_good``, serves at once (a restart once the source QEMU has quit)."""
        gate = ["--guest-stopped-for-good"] if stopped_for_good else ["--qmp", str(self.serve_monitor)]
        self.serves += 1
        out = (self.workdir / f"serve-{self.serves}.log").open("wb")
        self.serve_proc = subprocess.Popen(
            umemd_command("serve", str(self.ram_file),
                          "--connect", f"127.0.0.1:{self.topo.host_port('umem-page')}", "--key-file", str(self.key),
                          "--migration-id", self.migration_id, *gate,
                          "--report", str(self.workdir / f"serve-{self.serves}.json"), *self.daemon_args, *extra,
                          verbose=True),
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=CHECKOUT,
            preexec_fn=die_with_driver(signal.SIGTERM))
        out.close()
        return self.serve_proc

    def kill_serve(self) -> None:
        assert self.serve_proc is not None
        self.serve_proc.send_signal(signal.SIGKILL)
        self.serve_proc.wait()

    def migrate_argv(self, *extra: str) -> list[str]:
        return umemd_command("migrate", "--src-qmp", str(self.migrate_monitor),
                             "--dst-qmp", f"127.0.0.1:{self.topo.host_port('umem-qmp')}",
                             "--dst-status", str(self.status),
                             "--uri", f"tcp:127.0.0.1:{self.topo.host_port('migration')}",
                             "--incoming", f"tcp:{self.topo.bind}:{self.topo.guest_port('migration')}", *extra)

    async def pull_report(self) -> dict[str, Any]:
        data = await self.topo.agent.read_file(self.pull_report_path)
        report: dict[str, Any] = json.loads(data)
        return report

    async def source_quit(self, timeout: float = 600) -> None:
        """Wait until the source QEMU has quit (its QMP socket answers no more)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(str(self.serve_qmp))
            except OSError:
                return
            writer.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"the source QEMU still answers on {self.serve_qmp} after {timeout} s")
            await asyncio.sleep(0.5)

    async def missing_pages(self) -> int:
        """Pages of the instance not present yet, from ``umemd list`` in the VM."""
        reply = await self.topo.agent.request("run", argv=umemd_command("list", "--json", python=VENV_PYTHON))
        if reply["returncode"]:
            raise RuntimeError(f"umemd list failed: {reply['output']}")
        for instance in json.loads(reply["output"]):
            if instance["name"] == self.name:
                return int(instance["size"]) // PAGE_SIZE - int(instance["present"])
        raise RuntimeError(f"instance {self.name} is gone: {reply['output']}")

    async def wait_pull(self, timeout: float = 60) -> int:
        """Wait for the current pull to exit; its exit status."""
        return await self.topo.agent.wait_exit(self.pull_name, timeout)

    async def stop(self) -> None:
        """Stop whatever still runs; save the daemons' logs in the workdir."""
        if self.serve_proc is not None and self.serve_proc.poll() is None:
            self.serve_proc.send_signal(signal.SIGTERM)
            try:
                self.serve_proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill_serve()
        for n in range(1, self.pulls + 1):
            name = f"{self.name}-pull-{n}"
            with contextlib.suppress(Exception):
                await self.topo.agent.request("stop", name=name, grace=10)
            with contextlib.suppress(Exception):
                out = await self.topo.agent.read_file(f"{self.topo.agent.hello['workdir']}/{name}.out")
                (self.workdir / f"pull-{n}.log").write_bytes(out)
        with contextlib.suppress(Exception):
            await self.topo.agent.request("run", argv=umemd_command("destroy", self.name, python=VENV_PYTHON))
        self.ram_file.unlink(missing_ok=True)


Inject = Callable[[UmemSide], Coroutine[Any, Any, None]]


@dataclass
class MigrationResult:
    """One umem migration of the test guest, as ``umemd migrate`` and the guest saw it."""

    report: dict[str, Any]                 # umemd migrate --report
    migrate_output: str
    src_log: WorkloadLog
    dst_log: WorkloadLog
    dst_query: dict[str, Any]              # the destination's query-migrate after completion
    dst_status: str                        # its query-status
    passes_after: int                      # destination verification passes begun after the last page

    @property
    def verify_failures(self) -> int:
        return (self.src_log.total_bad + self.dst_log.total_bad + len(self.src_log.bad) + len(self.dst_log.bad)
                + len(self.src_log.errors) + len(self.dst_log.errors))

    def verdict(self) -> str:
        ok = self.verify_failures == 0 and self.passes_after > 0 and self.dst_status == "running"
        return (f"guest verification: {'PASS' if ok else 'FAIL'} ({self.passes_after} full passes over the "
                f"workload on the destination after the last page, {self.verify_failures} bad pages or errors; "
                f"destination {self.dst_status}, {len(self.dst_log.heartbeats)} heartbeats there)")


async def migrate_guest(topo: Topology, guest: GuestImage, settings: Settings, workdir: Path, *,
                        name: str = "vm0", serve_args: tuple[str, ...] = (), inject: Inject | None = None,
                        echo: bool = False, plot: Path | None = None) -> MigrationResult:
    """Boot the test guest on the host, start pull, the destination QEMU and serve, then run
    ``umemd migrate`` (its output echoed when ``echo``); ``inject`` runs beside it (fault injection)."""
    async with booted_source(topo, guest, settings, workdir, name) as (side, src, guest_args):
        return await _migrate_running(side, src, guest_args, settings, serve_args=serve_args, inject=inject,
                                      echo=echo, plot=plot)


@contextlib.asynccontextmanager
async def booted_source(topo: Topology, guest: GuestImage, settings: Settings, workdir: Path,
                        name: str, side: UmemSide | None = None) -> AsyncIterator[tuple[UmemSide, HostVm, list[str]]]:
    """The test guest running on the host (verified once), its umem side (``side``, or a plain one)
    and its guest arguments; the daemons are stopped and their logs saved at the end."""
    side = side or UmemSide(topo, workdir, name, parse_size(settings.ram))
    guest_args = migration_guest_args(guest, settings, topo.dst_accel)
    await insmod_on(topo)
    try:
        async with HostVm(workdir, "src", [*guest_args, *side.source_args()]) as src:
            await src.wait_serial(lambda log: len(log.verifies) >= 1, settings.boot_timeout,
                                  "the source guest's first verification pass")
            yield side, src, guest_args
    finally:
        await side.stop()


async def _migrate_running(side: UmemSide, src: HostVm, guest_args: list[str], settings: Settings, *,
                           serve_args: tuple[str, ...] = (), inject: Inject | None = None, echo: bool = False,
                           plot: Path | None = None, attempt: str = "") -> MigrationResult:
    """Migrate the running source guest ``src`` with a new pull, destination and serve."""
    report_path = side.workdir / f"migrate{attempt}.json"
    await side.start_pull()
    dst_args = ["-incoming", "defer", *guest_args, *side.destination_args()]
    async with side.topo.destination(f"dst-{side.name}{attempt}", dst_args, side.workdir) as dst:
        side.start_serve(*serve_args)
        argv = side.migrate_argv("--report", str(report_path), *(["--plot", str(plot)] if plot else []))
        output = await _run_migrate(argv, side.workdir / f"migrate{attempt}.log", echo, side, inject)
        await asyncio.sleep(1.0)  # the serial stream catches up
        base = len(dst.workload().verifies)
        await dst.wait_serial(lambda log: len(log.verifies) >= base + settings.passes_after,
                              settings.verify_timeout, "verification passes after the last page")
        dst_query = await dst.cmd("query-migrate")
        status = (await dst.cmd("query-status"))["status"]
        src_log, dst_log = src.workload(), dst.workload()
    return MigrationResult(json.loads(report_path.read_text()), output, src_log, dst_log, dst_query, status,
                           len(dst_log.verifies) - base)


@dataclass
class CancelledAttempt:
    """What a migration cancelled at pre-switchover left behind."""

    released_status: dict[str, Any]  # the pull's status once serve had released
    last_status: dict[str, Any]      # the pull's last status line
    pull_rc: int
    serve_rc: int
    serve_log: str
    source_status: str               # the source guest after the cancel (which verified its memory again)


async def cancelled_then_retried(topo: Topology, guest: GuestImage, settings: Settings, workdir: Path,
                                 name: str = "vm0") -> tuple[CancelledAttempt, MigrationResult]:
    """A migration cancelled in pre-switchover, after the page server released (the source guest
    runs on), then retried from the same running guest as a new migration: a new id, a fresh pull."""
    async with booted_source(topo, guest, settings, workdir, name) as (side, src, guest_args):
        cancelled = await _cancel_at_switchover(side, src, guest_args, settings)
        await topo.agent.request("run", argv=umemd_command("destroy", name, python=VENV_PYTHON))
        side.migration_id = secrets.token_hex(16)
        return cancelled, await _migrate_running(side, src, guest_args, settings, attempt="-retry")


async def _cancel_at_switchover(side: UmemSide, src: HostVm, guest_args: list[str],
                                settings: Settings) -> CancelledAttempt:
    """Drive QMP by hand: migrate with pause-before-switchover, wait until the pull says the
    source released, then migrate_cancel."""
    await side.start_pull()
    dst_args = ["-incoming", "defer", *guest_args, *side.destination_args()]
    async with side.topo.destination(f"dst-{side.name}-cancelled", dst_args, side.workdir) as dst:
        # The pull must still miss pages when the cancel comes: an uncapped push fills a small guest
        # between the release and the cancel, and the pull would then rightly complete. Capped, a data
        # page leaves every 4 s; zero hints are not capped.
        serve = side.start_serve("--max-push-rate", "0.001")
        await first_status(side.status, 120, lambda doc: PullState(doc["state"]) is PullState.PULLING)
        caps = ("x-ignore-shared", "events", "pause-before-switchover")
        await src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
        await dst.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps[:2]])
        await dst.cmd("migrate-incoming", uri=f"tcp:{side.topo.bind}:{side.topo.guest_port('migration')}")
        await src.cmd("migrate", uri=f"tcp:127.0.0.1:{side.topo.host_port('migration')}")
        await src.wait_migration({"pre-switchover"}, settings.migrate_timeout)
        released = await first_status(side.status, 120, lambda doc: bool(doc["source_released"]))
        # The pull ends as soon as serve aborts: its last line reaches only a client it has accepted.
        following = asyncio.Event()
        followed = asyncio.create_task(read_status(side.status, lambda doc: following.set(),
                                                   deadline=time.monotonic() + 300))
        await asyncio.wait_for(following.wait(), 60)
        await src.cmd("migrate_cancel")
        last = await followed
        pull_rc = await side.wait_pull(120)
        serve_rc = await asyncio.to_thread(serve.wait, 120)
        base = len(src.workload().verifies)
        await src.wait_serial(lambda log: len(log.verifies) > base, settings.verify_timeout,
                              "a verification pass of the source guest after the cancel")
        source_status = (await src.cmd("query-status"))["status"]
    return CancelledAttempt(released, last, pull_rc, serve_rc,
                            (side.workdir / f"serve-{side.serves}.log").read_text(errors="replace"), source_status)


async def _run_migrate(argv: list[str], log_path: Path, echo: bool, side: UmemSide, inject: Inject | None) -> str:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT, cwd=CHECKOUT)
    assert proc.stdout is not None
    injected = asyncio.create_task(inject(side)) if inject else None
    chunks = []
    with log_path.open("wb") as log:
        while data := await proc.stdout.read(OUTPUT_CHUNK):
            chunks.append(data)
            log.write(data)
            log.flush()
            if echo:
                sys.stdout.buffer.write(data)
                sys.stdout.flush()
    rc = await proc.wait()
    output = b"".join(chunks).decode(errors="replace")
    if injected is not None:
        await injected  # its failure (e.g. the pages were all there already) is the test's
    if rc:
        raise RuntimeError(f"umemd migrate exited {rc}:\n{output[-3000:]}")
    return output


async def wait_partly_present(side: UmemSide, low: float = 0.05, high: float = 0.8,
                              timeout: float = 600) -> dict[str, Any]:
    """Follow the pull's status until the source is serving and at least ``low`` of the pages
    are present; that status line, after checking that no more than ``high`` are (pages are
    still missing when the fault is injected)."""
    status = await first_status(side.status, timeout,
                                lambda doc: PullState(doc["state"]) is PullState.PULLING
                                and doc["present"] >= low * doc["pages"])
    share = status["present"] / status["pages"]
    if share > high:
        raise AssertionError(f"{share:.0%} of the pages were present before the fault could be injected: "
                             f"slow the push (serve --max-push-rate)")
    return status
