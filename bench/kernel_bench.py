"""umem vs userfaultfd inside the test VM: fault round trip and bulk fill.

Runs build/fault_bench (bench/fault_bench.c: the same C server logic for
both) several times, alternating the two, and prints a Markdown table for
docs/performance.md; --out also saves the raw results as JSON.

    make bench-kernel
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "build" / "fault_bench"
KINDS = ("umem", "uffd")
FILL_BYTES = 256 << 20
BATCHES = (4 << 10, 64 << 10, 2 << 20)


def run(*args: object) -> dict[str, object]:
    out = subprocess.run([str(BENCH), *map(str, args)], check=True, capture_output=True, text=True).stdout
    result: dict[str, object] = json.loads(out)
    return result


def median(results: list[dict[str, object]], key: str) -> float:
    return statistics.median(float(str(r[key])) for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=10_000, help="faults per round-trip run (default 10000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    parser.add_argument("--out", type=Path, help="write the raw results here as JSON")
    args = parser.parse_args()

    results: list[dict[str, object]] = []
    for _ in range(args.runs):
        for kind in KINDS:
            results.append(run("roundtrip", kind, args.faults))
            for batch in BATCHES:
                results.append(run("fill", kind, FILL_BYTES, batch))

    def pick(test: str, kind: str, batch: int | None = None) -> list[dict[str, object]]:
        return [r for r in results
                if r["test"] == test and r["kind"] == kind and (batch is None or r["batch"] == batch)]

    lines = [f"Machine: {platform.machine()}, kernel {platform.release()}, {args.runs} runs, medians.", ""]
    lines += ["| fault round trip | p50 µs | p90 µs | p99 µs |", "| --- | ---: | ---: | ---: |"]
    for kind in KINDS:
        rs = pick("roundtrip", kind)
        lines.append(f"| {kind} ({args.faults} faults) | {median(rs, 'p50_us'):.1f} | {median(rs, 'p90_us'):.1f} "
                     f"| {median(rs, 'p99_us'):.1f} |")
    ratio = [median(pick("roundtrip", "umem"), k) / median(pick("roundtrip", "uffd"), k) for k in ("p50_us", "p99_us")]
    lines.append(f"| umem / uffd | {ratio[0]:.2f}x | | {ratio[1]:.2f}x |")
    lines += ["", "| bulk fill, 256 MiB | umem MiB/s | UFFDIO_COPY MiB/s | umem / uffd |",
              "| --- | ---: | ---: | ---: |"]
    for batch in BATCHES:
        umem, uffd = (median(pick("fill", k, batch), "mib_per_s") for k in KINDS)
        lines.append(f"| {batch >> 10} KiB batches | {umem:.0f} | {uffd:.0f} | {umem / uffd:.2f}x |")
    print("\n".join(lines))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
