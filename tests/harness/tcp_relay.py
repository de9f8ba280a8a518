"""A TCP relay for the chaos lane (``make test-chaos``), run inside the test VM.

``python3 tests/harness/tcp_relay.py 4447 10.77.0.2 4447 4448 10.78.0.2 4448`` listens on
0.0.0.0:4447 and 0.0.0.0:4448 (the guest ports slirp forwards from the host) and
relays every connection to its target, here ``umemd pull`` in a network namespace
behind a veth pair, so that netem and ``ip link set down`` on that veth act on the
page channels alone. A connection ends as a whole: when either side closes or
fails, what was read is written and both are closed (the daemons never half-close).
A target that does not accept within CONNECT_TIMEOUT (the link is down) closes the
client, which retries.

Standard library only: it runs under the VM's python3 before anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys

CONNECT_TIMEOUT = 5.0
CHUNK = 1 << 16


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()


async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter, host: str, port: int) -> None:
    try:
        target_r, target_w = await asyncio.wait_for(asyncio.open_connection(host, port), CONNECT_TIMEOUT)
    except (OSError, TimeoutError):
        client_w.close()
        return
    tasks = [asyncio.create_task(pipe(client_r, target_w)), asyncio.create_task(pipe(target_r, client_w))]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()
    for writer in (client_w, target_w):
        writer.close()


async def main(relays: list[tuple[int, str, int]]) -> None:
    servers = []
    for listen, host, port in relays:
        handler = functools.partial(relay, host=host, port=port)
        servers.append(await asyncio.start_server(handler, "0.0.0.0", listen, reuse_address=True))
        print(f"tcp_relay: 0.0.0.0:{listen} -> {host}:{port}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def parse_relays(argv: list[str]) -> list[tuple[int, str, int]]:
    """``LISTEN_PORT HOST PORT`` triples."""
    if not argv or len(argv) % 3:
        sys.exit("usage: tcp_relay.py LISTEN_PORT TARGET_HOST TARGET_PORT [LISTEN_PORT TARGET_HOST TARGET_PORT ...]")
    return [(int(argv[i]), argv[i + 1], int(argv[i + 2])) for i in range(0, len(argv), 3)]


if __name__ == "__main__":
    asyncio.run(main(parse_relays(sys.argv[1:])))
