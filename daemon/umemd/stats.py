"""Counters, the fault-latency histogram, progress lines and the JSON report."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from umemd.protocol import PAGE_SIZE

log = logging.getLogger(__name__)

LOG_EVERY = 5.0  # seconds between progress lines when stderr is not a terminal


def bucket_percentile(counts: Mapping[int, int], fraction: float) -> float:
    """Of a histogram by bucket upper bound: the bound of the bucket holding that fraction of
    the samples (0 if there are none)."""
    count = sum(counts.values())
    seen = 0
    for bound in sorted(counts):
        seen += counts[bound]
        if count and seen >= fraction * count:
            return float(bound)
    return 0.0


def bucket_bound(key: str) -> int:
    """The upper bound in µs of a bucket named as :meth:`LatencyHistogram.as_dict` names it."""
    return int(key.removeprefix("<").removesuffix("us"))


class LatencyHistogram:
    """Fault latencies in power-of-two microsecond buckets (thread-safe)."""

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self._lock = threading.Lock()
        self.count = 0
        self.samples: list[tuple[float, float]] | None = None  # (fault at, latency), when kept

    def keep_samples(self) -> None:
        """Also keep every (fault time, latency) pair, for :meth:`PullStats.write_latency_log`."""
        self.samples = []

    def add(self, seconds: float, at: float = 0.0) -> None:
        """One fault served ``seconds`` after it was read, at ``at`` (``time.monotonic()``)."""
        micros = max(1, int(seconds * 1e6))
        with self._lock:
            if self.samples is not None:
                self.samples.append((at, seconds))
            bucket = micros.bit_length() - 1
            self._buckets[bucket] = self._buckets.get(bucket, 0) + 1
            self.count += 1

    def percentile(self, fraction: float) -> float:
        """Upper bound in µs of the bucket holding that fraction of samples (0 if none)."""
        with self._lock:
            return bucket_percentile({2 ** (b + 1): n for b, n in self._buckets.items()}, fraction)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {f"<{2 ** (b + 1)}us": n for b, n in sorted(self._buckets.items())}


@dataclass
class PullStats:
    """What ``umemd pull`` did."""

    name: str
    pages: int
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    faults: int = 0
    demand_pages: int = 0
    pushed_pages: int = 0
    zero_pages: int = 0
    skipped_pages: int = 0
    bytes_received: int = 0
    reconnects: int = 0
    attached: bool = False
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def report(self, present: int) -> dict[str, Any]:
        doc: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("latency", "started", "finished")}
        end = self.finished or time.monotonic()
        doc.update(
            present=present,
            seconds=round(end - self.started, 3),
            finished_unix=time.time() - (time.monotonic() - self.finished) if self.finished else None,
            fault_latency_us={"p50": self.latency.percentile(0.5), "p99": self.latency.percentile(0.99),
                              "histogram": self.latency.as_dict()},
        )
        return doc

    def write_latency_log(self, path: Path) -> None:
        """One line per served fault: when it was read (Unix time, s) and its latency (µs)."""
        to_unix = time.time() - time.monotonic()
        with path.open("w") as f:
            f.write("# fault_unix_s latency_us\n")
            for at, seconds in self.latency.samples or ():
                f.write(f"{at + to_unix:.6f} {seconds * 1e6:.0f}\n")

    def progress_line(self, present: int) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = present / elapsed
        eta = (self.pages - present) / rate if rate else float("inf")
        return (f"{self.name}: {present}/{self.pages} pages ({100 * present / self.pages:5.1f}%), "
                f"{rate * PAGE_SIZE / 2**20:6.1f} MiB/s, ETA {eta:5.1f} s, {self.faults} faults, "
                f"latency p50 {self.latency.percentile(0.5):.0f} µs p99 {self.latency.percentile(0.99):.0f} µs")


class ProgressLine:
    """A live progress line: rewritten in place on stderr when ``tty``, else logged at most
    every ``log_every`` seconds."""

    def __init__(self, tty: bool, width: int = 200, log_every: float = LOG_EVERY) -> None:
        self.tty = tty
        self.width = width
        self.log_every = log_every
        self._logged = 0.0

    def show(self, line: str) -> None:
        if self.tty:
            sys.stderr.write("\r" + line[:self.width] + "\033[K")
            sys.stderr.flush()
        elif time.monotonic() - self._logged >= self.log_every:
            self._logged = time.monotonic()
            log.info("%s", line)

    def end(self) -> None:
        """After the last line: the terminal's next output starts on a line of its own."""
        if self.tty:
            sys.stderr.write("\n")
