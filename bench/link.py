"""The link's own limit, as rows of the race (issue 13 item 3): between two runs, through the
forward the migration itself uses (host port → the test VM's migration port, where no QEMU
listens between runs), a raw TCP stream of as many non-zero bytes as post-copy moved, sent
with ``sendfile`` (no per-page work), and 4 KiB request/response round trips, requested from
the destination side as a pull requests a page. The receiving ends run in the test VM
(``python3 -m bench.raw_stream``, started by the agent); the host's ends run here, in a thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

from tests.harness import CHECKOUT
from tests.harness.topology import Topology
from umemd.protocol import PAGE_SIZE

from .metrics import percentile
from .raw_stream import ACK, MIB, answer_pings

ROUNDS = 2000  # round trips per probe


def stream_file(directory: Path, size: int) -> Path:
    """``directory``/stream.bin, ``size`` bytes, none of them zero: one file, rewritten when the next
    probe wants another size (each round's post-copy moves a few pages more or less)."""
    path = directory / "stream.bin"
    if not path.exists() or path.stat().st_size != size:
        directory.mkdir(parents=True, exist_ok=True)
        block = bytes(range(1, 256)) * (MIB // 255 + 1)
        with path.open("wb") as f:
            for start in range(0, size, MIB):
                f.write(block[:min(MIB, size - start)])
    return path


async def _wait_listening(topo: Topology, out: str, name: str) -> None:
    deadline = time.monotonic() + 120
    while b"listening" not in await topo.agent.read_file(out):
        if (await topo.agent.request("poll", name=name))["returncode"] is not None:
            raise RuntimeError(f"{name} exited before listening: {(await topo.agent.read_file(out)).decode()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not listen within 120 s")
        await asyncio.sleep(0.2)


async def _spawn(topo: Topology, name: str, *args: str) -> str:
    argv = ["python3", "-m", "bench.raw_stream", args[0], topo.bind, str(topo.guest_port("migration")), *args[1:]]
    out = str((await topo.agent.request("spawn", name=name, argv=argv, cwd=str(CHECKOUT)))["out"])
    await _wait_listening(topo, out, name)
    return out


async def _finish(topo: Topology, name: str, out: str) -> str:
    """Wait for the destination side's end to exit by itself (it has seen the whole exchange)."""
    try:
        rc = await topo.agent.wait_exit(name, 60, poll=0.1)
    except TimeoutError:
        await topo.agent.request("stop", 30, name=name, grace=5)
        raise
    text = (await topo.agent.read_file(out)).decode()
    if rc:
        raise RuntimeError(f"{name} on the destination side exited {rc}: {text}")
    return text


def _send_stream(port: int, path: Path) -> float:
    """Connect, sendfile the whole file, wait for the receiver's one byte: seconds, host clock."""
    with path.open("rb") as f:
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendfile(f)
            if sock.recv(1) != ACK:
                raise RuntimeError("the raw stream's receiver closed before it had every byte")
        return time.monotonic() - t0


def _answer(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return answer_pings(sock, PAGE_SIZE)


async def stream(topo: Topology, path: Path) -> dict[str, Any]:
    """The file through the migration's forward: from connect to the receiver's last byte."""
    size = path.stat().st_size
    out = await _spawn(topo, "raw-stream", "recv", str(size), "--ack")
    seconds = await asyncio.to_thread(_send_stream, topo.host_port("migration"), path)
    await _finish(topo, "raw-stream", out)
    return {"bytes": size, "seconds": seconds, "mb_per_s": size / 1e6 / seconds}


async def round_trips(topo: Topology, rounds: int = ROUNDS) -> dict[str, Any]:
    """``rounds`` 8-byte requests from the destination side, each answered with a page."""
    out = await _spawn(topo, "raw-ping", "ping", str(rounds), str(PAGE_SIZE))
    answered = await asyncio.to_thread(_answer, topo.host_port("migration"))
    times_ns: list[int] = json.loads((await _finish(topo, "raw-ping", out)).splitlines()[-1])
    if answered != rounds or len(times_ns) != rounds:
        raise RuntimeError(f"{answered} of {rounds} round trips answered, {len(times_ns)} timed")
    times_ms = [t / 1e6 for t in times_ns]
    return {"rounds": rounds, "p50_ms": percentile(times_ms, 50), "p99_ms": percentile(times_ms, 99),
            "page_bytes": PAGE_SIZE}


async def probe(topo: Topology, path: Path) -> dict[str, Any]:
    """Both limits, one after the other (nothing else on the link)."""
    return {"stream": await stream(topo, path), "round_trip": await round_trips(topo)}
