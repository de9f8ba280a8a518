"""A synthetic guest: threads that touch pages of a umem instance and check
each against the source RAM file, then a checksum of the whole mapping.

    python -m tests.daemon.guest NODE SOURCE {sequential,random,strided} THREADS TOUCHES

Prints "ok <touches> <sha256>" or "BAD <offset>" lines; exit 0 when every
page matched.
"""

from __future__ import annotations

import hashlib
import mmap
import random
import sys
import threading
from pathlib import Path

from tests.harness.mapping import PAGE_SIZE, Mapping


def offsets(pattern: str, pages: int, seed: int, touches: int) -> list[int]:
    rng = random.Random(seed)
    if pattern == "sequential":
        start = rng.randrange(pages)
        return [((start + i) % pages) * PAGE_SIZE for i in range(touches)]
    if pattern == "strided":
        return [((seed + i * 33) % pages) * PAGE_SIZE for i in range(touches)]
    return [rng.randrange(pages) * PAGE_SIZE for _ in range(touches)]


def main() -> int:
    node, source, pattern, threads, touches = sys.argv[1:6]
    with open(source, "rb") as f:
        expected = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    size = len(expected)
    mapping = Mapping(Path(node), size)
    bad: list[int] = []

    def touch(seed: int) -> None:
        for offset in offsets(pattern, size // PAGE_SIZE, seed, int(touches)):
            if mapping.read(offset, PAGE_SIZE) != expected[offset:offset + PAGE_SIZE]:
                bad.append(offset)

    workers = [threading.Thread(target=touch, args=(seed,)) for seed in range(int(threads))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    for offset in bad:
        print(f"BAD {offset:#x}", flush=True)
    whole = mapping.read(0, size)
    print(f"ok {int(threads) * int(touches)} {hashlib.sha256(whole).hexdigest()}", flush=True)
    return 1 if bad or whole != expected[:] else 0


if __name__ == "__main__":
    sys.exit(main())
