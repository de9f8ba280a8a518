"""python -m tests.harness.demo: the README's `make demo`, a real post-copy migration with umem.

1. Boots the test VM, which plays the destination host (Debian's kernel,
   umem.ko loaded, `umemd pull` and the patched QEMU started there).
2. Boots the test guest on this host with its RAM in a shared file, and
   waits for its workload's first verification pass.
3. Starts `umemd serve` here and runs `umemd migrate` with live progress: the
   guest switches to the destination at once; its RAM follows on demand and in
   the background.
4. Prints the report, then the guest's own verdict: a full verification pass
   over its workload on the destination, begun after the last page arrived.

Logs, the JSON report and the plot stay in build/demo/.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from tests.harness import CHECKOUT
from tests.harness.machine import Settings, guest_image
from tests.harness.topology import VmTopology
from tests.harness.umem import PORTS, migrate_guest


def say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


async def demo(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir
    settings = Settings(ram=args.ram, mib=args.mib, passes_after=1)
    guest = guest_image()
    say("booting the test VM, the destination host (Debian's kernel under TCG: about 30 s)")
    t0 = time.monotonic()
    async with VmTopology(workdir / "vm", PORTS, timeout=1800) as topo:
        say(f"test VM up in {time.monotonic() - t0:.0f} s; booting the {settings.ram} guest here (the source), "
            f"then migrating it into the VM with umemd migrate")
        result = await migrate_guest(topo, guest, settings, workdir, name="demo", echo=True,
                                     plot=workdir / "migration.png")
    say(result.verdict())
    print(f"   report: {workdir / 'migrate.json'}\n   plot:   {workdir / 'migration.png'}\n"
          f"   logs:   {workdir}/ (src/dst serial consoles, serve-*.log, pull-*.log, migrate.log)")
    return 0 if result.verify_failures == 0 and result.passes_after > 0 and result.dst_status == "running" else 1


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness.demo", description=__doc__.splitlines()[0])
    p.add_argument("--ram", default="512M", help="guest RAM (default 512M)")
    p.add_argument("--mib", type=int, default=128, help="MiB the guest's workload writes and verifies (default 128)")
    p.add_argument("--workdir", type=Path, default=CHECKOUT / "build" / "demo", help="default build/demo")
    args = p.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(demo(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
