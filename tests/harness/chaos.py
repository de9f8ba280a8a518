"""The chaos lane's topology (``make test-chaos``, tests/chaos): the e2e topology of
tests/harness/umem.py with a shaped page link and relayed QMP monitors.

Where faults act:

- **the page link** (inside the test VM, which has netem; the host has neither netem nor
  modules): ``umemd pull`` runs in the network namespace ``umem-chaos``, reached over two
  veth pairs: ``uc-page`` (10.77.0.1 ↔ 10.77.0.2) carries the page channels and takes the
  faults (``ip link set down``, netem loss, delay and reordering on both ends), ``uc-status``
  (10.78.0.1 ↔ 10.78.0.2) carries the pull's status endpoint and is never touched.
  ``tcp_relay.py`` in the VM's main namespace listens on the guest ports slirp forwards
  (umem-page, umem-status) and relays into the namespace. The migration stream, the QMP
  monitors and the agent do not cross either veth;
- **the QMP monitors** (host): ``umemd serve --qmp`` and ``umemd migrate --src-qmp`` reach the
  source QEMU through :class:`QmpRelay`, a unix-socket relay in the harness that can drop
  its connections (serve's monitor lost) and hold a command (``migrate``,
  ``migrate-continue``, ``quit``) until the harness lets it through, so a fault lands at an
  exact phase of the migration (the source paused at pre-switchover, the serve released).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from tests.harness import CHECKOUT
from tests.harness.topology import Topology
from tests.harness.umem import UmemSide

NETNS = "umem-chaos"
PAGE_IF, PAGE_PEER, PAGE_HERE, PAGE_THERE = "uc-page", "uc-page-ns", "10.77.0.1", "10.77.0.2"
STATUS_IF, STATUS_PEER, STATUS_HERE, STATUS_THERE = "uc-status", "uc-status-ns", "10.78.0.1", "10.78.0.2"
RELAY = "chaos-relay"


class ChaosNet:
    """The namespace, its two veth pairs and the relay inside the test VM (set up once)."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo

    async def sh(self, script: str) -> str:
        reply = await self.topo.agent.request("run", timeout=70, argv=["sh", "-ec", script], limit=60)
        if reply["returncode"]:
            raise RuntimeError(f"in the test VM, {script!r} failed: {reply['output']}")
        return str(reply["output"])

    async def setup(self) -> None:
        lines = ["modprobe veth", "modprobe sch_netem", f"ip netns add {NETNS}", f"ip -n {NETNS} link set lo up"]
        for here_if, peer_if, here, there in ((PAGE_IF, PAGE_PEER, PAGE_HERE, PAGE_THERE),
                                              (STATUS_IF, STATUS_PEER, STATUS_HERE, STATUS_THERE)):
            lines += [f"ip link add name {here_if} type veth peer name {peer_if}",
                      f"ip link set {peer_if} netns {NETNS}",
                      f"ip addr add {here}/24 dev {here_if}", f"ip link set {here_if} up",
                      f"ip -n {NETNS} addr add {there}/24 dev {peer_if}", f"ip -n {NETNS} link set {peer_if} up"]
        await self.sh("\n".join(lines))
        page, status = self.topo.guest_port("umem-page"), self.topo.guest_port("umem-status")
        await self.topo.agent.request("spawn", name=RELAY, cwd=str(CHECKOUT),
                                      argv=["python3", "tests/harness/tcp_relay.py", str(page), PAGE_THERE, str(page),
                                            str(status), STATUS_THERE, str(status)])

    async def teardown(self) -> None:
        with contextlib.suppress(Exception):
            await self.topo.agent.request("stop", name=RELAY, grace=5)
        with contextlib.suppress(Exception):
            await self.sh(f"ip link del {PAGE_IF}; ip link del {STATUS_IF}; ip netns del {NETNS}")

    async def link(self, up: bool) -> None:
        await self.sh(f"ip link set {PAGE_IF} {'up' if up else 'down'}")

    async def netem(self, spec: str | None) -> None:
        """netem ``spec`` (e.g. ``delay 20ms 5ms loss 2% reorder 10%``) on both ends of the page
        link, or none."""
        if spec is None:
            await self.sh(f"tc qdisc del dev {PAGE_IF} root || true\n"
                          f"tc -n {NETNS} qdisc del dev {PAGE_PEER} root || true")
        else:
            await self.sh(f"tc qdisc replace dev {PAGE_IF} root netem {spec}\n"
                          f"tc -n {NETNS} qdisc replace dev {PAGE_PEER} root netem {spec}")

    async def reset(self) -> None:
        """Between runs: the link up, no netem."""
        await self.link(True)
        await self.netem(None)


class ChaosSide(UmemSide):
    """A umem side whose pull runs in the namespace and whose QMP clients go through relays."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.pull_netns = NETNS

    @property
    def serve_monitor(self) -> Path:
        return self.workdir / "serve-relay.qmp"

    @property
    def migrate_monitor(self) -> Path:
        return self.workdir / "migrate-relay.qmp"


@dataclass
class _Gate:
    open: asyncio.Event = field(default_factory=asyncio.Event)     # set: the command passes
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # a client sent it while held


class QmpRelay:
    """A unix-socket relay in front of a QMP monitor of the source QEMU (harness side).

    Client → monitor bytes are split into JSON objects (QMP clients send no newlines); a command
    held with :meth:`hold` waits, with everything after it, until :meth:`release`. :meth:`drop`
    closes every current connection (the monitor lost); new ones are accepted."""

    def __init__(self, listen: Path, target: Path) -> None:
        self.listen = listen
        self.target = target
        self.gates: dict[str, _Gate] = {}
        self.passed: set[str] = set()  # commands let through so far
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> QmpRelay:
        self.server = await asyncio.start_unix_server(self._client, str(self.listen))
        return self

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        assert self.server is not None
        self.server.close()
        self.drop()
        for gate in self.gates.values():
            gate.open.set()
        self.listen.unlink(missing_ok=True)

    def hold(self, command: str) -> None:
        self.gates[command] = _Gate()

    def release(self, command: str) -> None:
        self.gates.pop(command).open.set()

    async def reached(self, command: str) -> None:
        """Until a client has sent ``command`` and it is held."""
        await self.gates[command].reached.wait()

    @contextlib.asynccontextmanager
    async def holding(self, command: str) -> AsyncIterator[None]:
        self.hold(command)
        try:
            yield
        finally:
            self.release(command)

    def drop(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            mon_reader, mon_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.close()
            return
        self.writers += [writer, mon_writer]
        tasks = [asyncio.create_task(self._commands(reader, mon_writer)),
                 asyncio.create_task(_pipe(mon_reader, writer))]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()
        for w in (writer, mon_writer):
            w.close()
            if w in self.writers:
                self.writers.remove(w)

    async def _commands(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buffer = ""
        decoder = json.JSONDecoder()
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                buffer += data.decode()
                while buffer.strip():
                    buffer = buffer.lstrip()
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break  # not whole yet
                    await self._forward(message, buffer[:end], writer)
                    buffer = buffer[end:]

    async def _forward(self, message: object, text: str, writer: asyncio.StreamWriter) -> None:
        command = str(message.get("execute", "")) if isinstance(message, dict) else ""
        gate = self.gates.get(command)
        if gate is not None:
            gate.reached.set()
            await gate.open.wait()
        self.passed.add(command)
        writer.write(text.encode())
        await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
