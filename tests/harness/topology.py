"""Where the two QEMUs of a benchmark run, and how the host reaches them.

The end-to-end topology (BRIEF §5): the source QEMU runs the test guest on the
host; the destination QEMU (the same patched binary, ``make qemu``'s
``current``, through the test VM's root share) runs inside the test VM
booted by ``tests/harness/vm``, and the host reaches it only through slirp port
forwards bound to 127.0.0.1 (``--hostfwd``). Everything connects from the
host to the VM:

=========  ==========  =====================================================
name       guest port  what
=========  ==========  =====================================================
agent      4440        ``vm_agent.py``: starts/stops destination
                       processes, clock probes, files back
migration  4444        ``migrate-incoming tcp:0.0.0.0:4444``; postcopy-preempt
                       opens its second channel to the same port
qmp        4445        the destination QEMU's QMP (``-qmp tcp:…,server=on``)
serial     4446        the destination guest's serial console
=========  ==========  =====================================================

More forwards (umem's page channel, tests/harness/umem.py) are asked for with
``extra_ports``.

:class:`VmTopology` is that. :class:`HostTopology` runs the same agent as a
local process and the destination on the host, with the same code path, as a
reference point and to debug the harness quickly.

slirp accepts a connection on a forwarded port even when nothing listens in
the guest, and closes it at once: every client here retries until its peer
speaks (the agent's greeting, QMP's greeting) or, for the serial console,
until the connection stays open.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message

from tests.harness import CHECKOUT
from tests.harness.machine import Vm, qemu_base_args
from tests.harness.net import free_port

# The destination QEMU's accelerator in the test VM for the e2e, chaos and demo harness: TCG
# (in TCG) unless UMEM_DST_ACCEL=kvm, nested under the test VM's emulated SVM, as umem will run
# (its async page faults take the RETRY_NOWAIT path that TCG never does). Not KVM by default:
# nested under TCG it hangs or crashes the test VM now and then (docs/performance.md, "The
# destination under KVM"). The race (bench/race.py) asks for KVM itself.
DST_ACCEL = os.environ.get("UMEM_DST_ACCEL", "tcg")
READ_CHUNK = 4 << 20    # bytes per agent read (base64 on one line)
# RemoteVm.diagnose()'s shell part, run on the destination side ({pid}: the destination QEMU).
DIAGNOSE = r"""
for d in /sys/class/umem/*/; do [ -d "$d" ] && echo "== umem $d" && grep -H . "$d"served "$d"stats/*; done
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug 2>/dev/null
echo "== kvm"; grep -H . /sys/kernel/debug/kvm/* 2>/dev/null | grep -E "async_pf|pf_|halt_|exits|irq"
for p in {pid} $(pgrep -f umemd); do
  echo "== process $p: $(tr '\0' ' ' </proc/$p/cmdline | cut -c1-200)"
  for t in /proc/$p/task/*; do
    echo "-- $t $(cat $t/comm) $(grep State $t/status) wchan=$(cat $t/wchan)"; cat $t/stack
  done
done
echo "== dmesg"; dmesg | tail -40
"""
LINE_LIMIT = 16 << 20   # the agent connection's line limit
AGENT = CHECKOUT / "tests" / "harness" / "vm_agent.py"  # a script: standard library only
BASE_PORTS = {"agent": 4440, "migration": 4444, "qmp": 4445, "serial": 4446}


class TimedEvents(EventListener):
    """Records every QMP event with the host's arrival time (``time.time_ns()``)."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[tuple[int, Message]] = []

    def accept(self, event: Message) -> bool:
        self.log.append((time.time_ns(), event))
        return False  # kept here, not queued

    def find(self, name: str) -> tuple[int, int] | None:
        """(arrival_ns on the host, QEMU's own timestamp in ns) of the first ``name`` event."""
        for arrival, event in self.log:
            if event["event"] == name:
                ts: dict[str, int] = event["timestamp"]  # type: ignore[assignment]
                return arrival, int(ts["seconds"]) * 10**9 + int(ts["microseconds"]) * 1000
        return None

    def dump(self) -> list[dict[str, Any]]:
        return [{"arrival_ns": a, "event": e["event"], "timestamp": e["timestamp"],
                 "data": e.get("data", {})} for a, e in self.log]


class HostVm(Vm):
    """The source: :class:`tests.harness.machine.Vm` with timed events."""

    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        super().__init__(workdir, name, args)
        self.events = TimedEvents()
        self.qmp.register_listener(self.events)

    async def __aenter__(self) -> HostVm:
        await super().__aenter__()
        return self


@dataclass(frozen=True)
class ClockSample:
    """The destination side's clock minus the host's, from one agent round trip."""

    offset_ns: int
    rtt_ns: int
    host_ns: int  # host time at the middle of the round trip

    @property
    def uncertainty_ns(self) -> int:
        return self.rtt_ns // 2


class AgentError(RuntimeError):
    pass


class AgentClient:
    """The host's end of ``vm_agent.py``'s connection."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.lock = asyncio.Lock()
        self.hello: dict[str, Any] = {}

    async def connect(self, port: int, deadline: float, alive: Any = None) -> None:
        """Connect to 127.0.0.1:``port`` until the agent greets (slirp accepts early)."""
        last: BaseException | None = None
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise AgentError("the agent's side exited before the agent answered")
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port, limit=LINE_LIMIT), 5)
                try:
                    line = await asyncio.wait_for(reader.readline(), 5)
                    hello = json.loads(line) if line else {}
                    if hello.get("agent") == "umem-bench":
                        self.reader, self.writer, self.hello = reader, writer, hello
                        return
                    last = AgentError(f"unexpected greeting {line!r}")
                except (TimeoutError, ValueError, OSError) as e:
                    last = e
                writer.close()
            except (TimeoutError, OSError) as e:
                last = e
            await asyncio.sleep(0.5)
        raise AgentError(f"no agent greeting on 127.0.0.1:{port}: {last!r}")

    async def request(self, op: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        assert self.reader is not None and self.writer is not None, "not connected"
        async with self.lock:
            self.writer.write(json.dumps({"op": op, **args}).encode() + b"\n")
            await self.writer.drain()
            line = await asyncio.wait_for(self.reader.readline(), timeout)
        if not line:
            raise AgentError(f"agent closed the connection during {op!r}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise AgentError(f"agent {op}: {reply.get('error')}")
        return reply

    async def wait_exit(self, name: str, timeout: float, poll: float = 0.5) -> int:
        """Wait for the agent's process ``name`` to exit; its exit status (TimeoutError after
        ``timeout`` seconds, the process left running)."""
        deadline = time.monotonic() + timeout
        while (rc := (await self.request("poll", name=name))["returncode"]) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still running after {timeout} s")
            await asyncio.sleep(poll)
        return int(rc)

    async def read_file(self, path: str, timeout: float = 60) -> bytes:
        chunks, offset = [], 0
        while True:
            reply = await self.request("read", timeout, path=path, offset=offset, max=READ_CHUNK)
            data = base64.b64decode(reply["data"])
            chunks.append(data)
            offset += len(data)
            if not data or offset >= reply["size"]:
                return b"".join(chunks)

    async def clock(self, probes: int = 9) -> ClockSample:
        """Offset of the agent's ``CLOCK_REALTIME`` from the host's, from the fastest of
        ``probes`` round trips: offset = remote - (sent + received) / 2, error ≤ rtt / 2."""
        best: ClockSample | None = None
        for _ in range(probes):
            t0 = time.time_ns()
            remote = int((await self.request("time", 10))["t"])
            t1 = time.time_ns()
            mid = (t0 + t1) // 2
            sample = ClockSample(remote - mid, t1 - t0, mid)
            if best is None or sample.rtt_ns < best.rtt_ns:
                best = sample
        assert best is not None
        return best

    async def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.request("exit", 10), 15)
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
            self.reader = self.writer = None


class SerialTap:
    """Copies a serial console served on a TCP port into a local file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.task: asyncio.Task[None] | None = None

    async def start(self, port: int, deadline: float) -> None:
        self.path.write_bytes(b"")
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
            except (TimeoutError, OSError) as e:
                last = e
                await asyncio.sleep(0.5)
                continue
            # A forward with no listener behind it is closed at once; a real
            # chardev stays open (and says nothing before the guest runs).
            try:
                first = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                first = b""
                self.task = asyncio.create_task(self._copy(reader, writer, first))
                return
            if first:
                self.task = asyncio.create_task(self._copy(reader, writer, first))
                return
            writer.close()
            last = EOFError("closed at once")
            await asyncio.sleep(0.5)
        raise RuntimeError(f"serial console on 127.0.0.1:{port} did not open: {last!r}")

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes) -> None:
        with self.path.open("ab") as f:
            f.write(first)
            f.flush()
            while data := await reader.read(65536):
                f.write(data)
                f.flush()
        writer.close()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task


class Topology:
    """Base: the agent, the port map, the destination's bind address."""

    name = "?"
    bind = "127.0.0.1"  # address destination sockets listen on
    dst_accel = "tcg"   # the destination QEMU's accelerator

    def __init__(self, workdir: Path, extra_ports: dict[str, int] | None = None) -> None:
        self.workdir = workdir
        self.guest_ports = {**BASE_PORTS, **(extra_ports or {})}
        self.host_ports: dict[str, int] = {}
        self.agent = AgentClient()

    def host_port(self, name: str) -> int:
        return self.host_ports[name]

    def guest_port(self, name: str) -> int:
        return self.guest_ports[name]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "guest_ports": self.guest_ports, "host_ports": self.host_ports,
                "dst_accel": self.dst_accel}

    async def __aenter__(self) -> Topology:
        await self.start()
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def destination(self, name: str, args: list[str], workdir: Path, trace_log: str | None = None) -> RemoteVm:
        """A destination QEMU (not started yet); its serial and output land in ``workdir``."""
        return RemoteVm(self, name, args, workdir, trace_log)

    def remote_path(self, name: str) -> str:
        """A scratch path on the destination side (the agent's workdir; the VM's tmpfs)."""
        return f"{self.agent.hello['workdir']}/{name}"


class _AgentProcess(Topology):
    """Shared by both topologies: one subprocess whose life is the agent's."""

    proc: subprocess.Popen[bytes] | None = None
    boot_timeout = 300.0
    out_name = "agent.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with (self.workdir / self.out_name).open("wb") as out:
            self.proc = subprocess.Popen(self.command(), cwd=CHECKOUT, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await self.agent.connect(self.host_port("agent"), time.monotonic() + self.boot_timeout,
                                     alive=lambda: self.proc is not None and self.proc.poll() is None)
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await self.agent.close()
        if self.proc is None:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 60)
        except TimeoutError:
            # tests.harness.vm unwinds on SIGTERM (it kills its QEMU); the agent just exits.
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), 30)
            except TimeoutError:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


class HostTopology(_AgentProcess):
    """Destination on the host too (loopback): a reference, and a quick harness check."""

    name = "host"
    bind = "127.0.0.1"
    boot_timeout = 30.0

    def __init__(self, workdir: Path, extra_ports: dict[str, int] | None = None) -> None:
        super().__init__(workdir, extra_ports)
        for name in self.guest_ports:
            port = free_port()
            self.guest_ports[name] = self.host_ports[name] = port

    def command(self) -> list[str]:
        return [sys.executable, str(AGENT), "--host", "127.0.0.1", "--port", str(self.guest_port("agent")),
                "--workdir", str(self.workdir / "agent"), "--timeout", "600"]


class VmTopology(_AgentProcess):
    """Destination inside the test VM (``python3 -m tests.harness.vm``), booted once for all runs."""

    name = "vm"
    bind = "0.0.0.0"
    out_name = "vm-output.log"

    def __init__(self, workdir: Path, extra_ports: dict[str, int] | None = None, *,
                 timeout: float = 3600, vm_args: list[str] | None = None, dst_accel: str = DST_ACCEL) -> None:
        super().__init__(workdir, extra_ports)
        self.host_ports = {name: free_port() for name in self.guest_ports}
        self.timeout = timeout
        self.vm_args = vm_args or []
        self.dst_accel = dst_accel

    async def start(self) -> None:
        await super().start()
        if self.dst_accel == "kvm":
            await self.load_kvm()

    async def load_kvm(self) -> None:
        """KVM inside the test VM: TCG's ``-cpu max`` emulates SVM, so kvm_amd loads (nested), with
        shadow paging (``npt=0``): on TCG's emulated nested paging the destination guest livelocked
        on a fault KVM had fixed, or the test VM's kernel crashed, in about a third of the runs
        (docs/performance.md, "The destination under KVM"); on shadow paging in none."""
        load = ("if grep -qw svm /proc/cpuinfo; then modprobe kvm_amd npt=0; else modprobe kvm_intel; fi"
                " && test -c /dev/kvm")
        reply = await self.agent.request("run", 120, argv=["sh", "-c", load], limit=100)
        if reply["returncode"]:
            await self.stop()
            raise AgentError(f"no KVM in the test VM for the destination ({reply['output'].strip()}): "
                             "set UMEM_DST_ACCEL=tcg (bench.race: --dst-accel tcg) for TCG in TCG")

    def command(self) -> list[str]:
        fwd = [a for name, g in self.guest_ports.items() for a in ("--hostfwd", f"{self.host_ports[name]}:{g}")]
        return [sys.executable, "-m", "tests.harness.vm", "--net", *fwd, "--timeout", str(self.timeout),
                "--console-log", str(self.workdir / "vm-console.log"), *self.vm_args, "--",
                "python3", str(AGENT.relative_to(CHECKOUT)), "--port", str(self.guest_port("agent")),
                "--timeout", "600"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "vm_command": self.command()}


class RemoteVm(Vm):
    """A destination QEMU started by the agent; QMP and serial over (forwarded) TCP.

    Same interface as :class:`HostVm` (``cmd``, ``serial``, ``wait_serial``,
    ``wait_migration``, ``events``), so a run does not care where it is.
    """

    serial_poll = 0.5  # its serial log is a copy, over the forwarded console port

    def __init__(self, topo: Topology, name: str, args: list[str], workdir: Path,
                 trace_log: str | None = None) -> None:
        # Not Vm.__init__: nothing of it applies except the QMP client.
        self.topo = topo
        self.name = name
        self.proc = None
        self.qmp = QMPClient(name)
        self.events = TimedEvents()
        self.qmp.register_listener(self.events)
        self.serial_path = workdir / "dst.serial"
        self.stderr_path = workdir / "dst.stderr"
        self.trace_log = trace_log
        self.tap = SerialTap(self.serial_path)
        self.out_path = ""
        self.accel = ""  # as the destination QEMU says, once started
        self.pid = 0
        bind = topo.bind
        self.args = [*qemu_base_args(topo.dst_accel), "-name", name,
                     "-qmp", f"tcp:{bind}:{topo.guest_port('qmp')},server=on,wait=off",
                     "-chardev", f"socket,id=serial0,host={bind},port={topo.guest_port('serial')},"
                                 "server=on,wait=off",
                     "-serial", "chardev:serial0", *args]
        if trace_log:
            self.args += ["-msg", "timestamp=on", "-D", trace_log]

    async def __aenter__(self) -> RemoteVm:
        spawned = await self.topo.agent.request("spawn", name=self.name, argv=self.args)
        self.out_path, self.pid = spawned["out"], int(spawned["pid"])
        deadline = time.monotonic() + 120
        last: BaseException | None = None
        while True:
            rc = await self.exit_status()
            if rc is not None:
                await self.fetch_stderr()
                raise RuntimeError(f"{self.name}: QEMU exited with {rc}: {self.stderr()}")
            try:
                await asyncio.wait_for(self.qmp.connect(("127.0.0.1", self.topo.host_port("qmp"))), 10)
                break
            except Exception as e:
                last = e
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: no QMP greeting within 120 s: {last!r}") from e
                await asyncio.sleep(0.5)
        await self.tap.start(self.topo.host_port("serial"), time.monotonic() + 30)
        self.accel = "kvm" if (await self.cmd("query-kvm")).get("enabled") else "tcg"
        if self.accel != self.topo.dst_accel:
            await self.__aexit__(None, None, None)
            raise RuntimeError(f"{self.name}: the destination QEMU runs under {self.accel}, "
                               f"not {self.topo.dst_accel} as asked")
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if et is not None and issubclass(et, Exception) and self.pid:  # not on a cancellation
            with contextlib.suppress(Exception):
                (self.stderr_path.parent / "dst.diagnosis").write_text(await self.diagnose())
        await self.quit(10)
        with contextlib.suppress(Exception):
            await self.topo.agent.request("stop", 40, name=self.name, grace=20)
        await self.tap.stop()
        with contextlib.suppress(Exception):
            await self.fetch_stderr()

    async def diagnose(self) -> str:
        """What the destination side was doing, for a run that failed while it still ran: the
        guest's vCPUs (QMP), the kernel stacks of QEMU's and the daemons' threads, every umem
        instance's counters and KVM's, on the destination side."""
        parts = []
        for command, args in (("query-status", {}), ("query-migrate", {}),
                              ("human-monitor-command", {"command-line": "info registers -a"})):
            try:
                reply = await asyncio.wait_for(self.cmd(command, **args), 10)
                parts.append(f"== {command} {args or ''}\n{str(reply)[:20000]}")
            except Exception as err:
                parts.append(f"== {command}: {err!r}")
        reply = await self.topo.agent.request("run", 60, argv=["sh", "-c", DIAGNOSE.format(pid=self.pid)], limit=50)
        parts.append(reply["output"])
        return "\n".join(parts)

    async def fetch_stderr(self) -> None:
        if self.out_path:
            self.stderr_path.write_bytes(await self.topo.agent.read_file(self.out_path))

    async def fetch_trace(self) -> str:
        if not self.trace_log:
            return ""
        try:
            return (await self.topo.agent.read_file(self.trace_log)).decode(errors="replace")
        except Exception:
            return ""

    async def exit_status(self) -> int | None:
        """The destination QEMU's exit status, as the agent sees it; None while it runs."""
        rc = (await self.topo.agent.request("poll", name=self.name))["returncode"]
        return None if rc is None else int(rc)
