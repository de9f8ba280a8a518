"""Stress: faulting threads on random pages of a 64 MiB instance while a
demand server and a background filler race; every byte is verified."""

from __future__ import annotations

import random
import select
import threading
from collections.abc import Callable

from tests.harness.mapping import Mapping
from umemd import Server, node_path
from umemd.protocol import PAGE_SIZE as PAGE

SIZE = 64 << 20
PAGES = SIZE // PAGE
FAULTERS = 4
TOUCHES = 1500
CHUNK = 64


def source_image() -> bytes:
    """64 MiB in which every 8-byte word names its page and position."""
    words = bytearray(SIZE)
    view = memoryview(words).cast("Q")
    for page in range(PAGES):
        base = page * (PAGE // 8)
        view[base] = 0x554D454D00000000 | page
    view.release()
    return bytes(words)


def demand_server(server: Server, image: bytes, stop: threading.Event) -> None:
    poller = select.poll()
    poller.register(server.fileno(), select.POLLIN)
    while not stop.is_set():
        if not poller.poll(50):
            continue
        faults = server.read_faults()
        server.fill([(f.offset, image[f.offset:f.offset + PAGE]) for f in faults])


def background_filler(server: Server, image: bytes) -> None:
    for start in range(0, SIZE, CHUNK * PAGE):
        server.fill([(start, image[start:start + CHUNK * PAGE])])


def test_random_faults_racing_a_background_fill(make_instance: Callable[..., Server]) -> None:
    image = source_image()
    server = make_instance(size=SIZE, nonblock=True)
    stop = threading.Event()
    demand = threading.Thread(target=demand_server, args=(server, image, stop), daemon=True)
    demand.start()
    errors: list[str] = []

    with Mapping(node_path(server.name), SIZE) as m:
        def fault(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(TOUCHES):
                offset = rng.randrange(PAGES) * PAGE + rng.randrange(PAGE // 8) * 8
                if m.read(offset, 8) != image[offset:offset + 8]:
                    errors.append(f"wrong bytes at {offset:#x}")

        faulters = [threading.Thread(target=fault, args=(seed,), daemon=True) for seed in range(FAULTERS)]
        for t in faulters:
            t.start()
        background_filler(server, image)
        for t in faulters:
            t.join(300)
        stop.set()
        demand.join(10)
        assert not errors, errors[:5]
        assert m.read(0, SIZE) == image

    stats = server.stats()
    assert stats.present == PAGES
    assert stats.filled + stats.zeroed == PAGES
    assert stats.faults > 0 and stats.waiters == 0
