"""python -m bench.profile_summary FILE: where a profiled pull spent its time.

Reads py-spy's raw output (``--format raw``: one folded stack per line, a
sample count at the end), written by ``make bench-e2e-profile`` into
build/bench-e2e-profile/umem-1/pull-1.profile (and by ``make bench-daemon-profile``
into build/profile-daemon-*.raw), and prints for each of umemd's threads its share
of samples by leaf frame: waiting (select, accept, wait), syscalls made from Python
(recv, send, the fill ioctl) and Python itself.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path


def fold_stacks(path: Path) -> dict[str, collections.Counter[str]]:
    """Per thread name, samples by leaf frame (function and file:line)."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        name = frames[0].partition(": ")[2] or frames[0]
        threads[name][frames[-1]] += int(count)
    return threads


def summarize_profile(path: Path, top: int = 6) -> str:
    """For each of umemd's threads, busiest first: its samples and its ``top`` leaf frames."""
    lines = []
    for name, leaves in sorted(fold_stacks(path).items(), key=lambda kv: -sum(kv[1].values())):
        if not name.startswith("umemd-"):
            continue
        total = sum(leaves.values())
        lines.append(f"{name}: {total} samples")
        lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in leaves.most_common(top)]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__.splitlines()[0])
    p.add_argument("profile", type=Path, help="py-spy raw output")
    p.add_argument("--top", type=int, default=6, help="leaf frames per thread (default 6)")
    args = p.parse_args(argv)
    print(summarize_profile(args.profile, args.top), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
