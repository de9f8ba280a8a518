"""Numbers from one run's raw material, and summaries over runs.

- :func:`page_requests`: page-request latency from the destination QEMU's
  trace log. QEMU 10.0 reports no request latency over QMP (its
  ``query-migrate`` has ``postcopy-blocktime`` and ``postcopy-vcpu-blocktime``
  only, with the ``postcopy-blocktime`` capability; ``postcopy-latency`` and
  friends are not in 10.0's ``qapi/migration.json``), so the destination runs
  with ``-trace postcopy_page_req_add -trace postcopy_page_req_del -msg
  timestamp=on -D FILE`` (and ``postcopy_ram_fault_thread_request``):
  ``postcopy_ram_fault_thread_request`` fires when the fault thread has read a
  fault from userfaultfd, ``postcopy_page_req_add`` when it queues the request
  of a missing page to the source, ``postcopy_page_req_del`` when that page is
  placed (``UFFDIO_COPY`` done, the faulting thread can go on); each prints
  the page's host address and a microsecond timestamp of one clock
  (``CLOCK_REALTIME``). 10.0's log backend prefixes ``TID@SECONDS.USEC:``;
  from 10.1 on the prefix is ``-msg timestamp=on``'s own, ISO 8601 in UTC
  (``2026-12-01T14:34:56.262322Z``, the fraction left out when it is 0).
  Both are parsed.
- :func:`qemu_latency`: QEMU 10.1 and later also report the latency over QMP
  (``postcopy-latency`` and ``postcopy-latency-dist``, with ``postcopy-blocktime``),
  from the fault's arrival at the fault thread to the page's placement: shown beside the
  trace-event figures.
- :func:`heartbeat_gaps`: the guest's stall as the guest itself saw it.
- :func:`event_interval`: STOP (source) -> RESUME (destination) across two
  clocks.
- :func:`summary`: median and range over runs.
"""

from __future__ import annotations

import calendar
import itertools
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from umemd.protocol import PAGE_SIZE
from umemd.stats import bucket_percentile

if TYPE_CHECKING:  # annotations only: bench.daemon_bench imports this module in the test VM
    from tests.harness.machine import WorkloadLog
    from tests.harness.topology import ClockSample

EARLY_S = 5.0  # "early" requests: faulted within this many seconds of RESUME
_TRACE = re.compile(r"^(?:\d+@(?P<s>\d+)\.(?P<us>\d{6}):"                         # 10.0
                    r"|(?P<iso>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(?P<frac>\d{1,6}))?Z )"  # 10.1+
                    r"(?P<event>\w+) (?P<rest>.*)$")
_ADDR = re.compile(r"(?:page req |HVA=)(0x[0-9a-f]+|\(nil\))")


def _trace_time_us(m: re.Match[str]) -> int:
    """A trace line's timestamp in µs since the epoch, from either prefix."""
    if m["iso"] is None:
        return int(m["s"]) * 1_000_000 + int(m["us"])
    seconds = calendar.timegm(time.strptime(m["iso"], "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000 + int((m["frac"] or "0").ljust(6, "0"))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan if there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


@dataclass
class PageRequests:
    faults: int                 # postcopy_ram_fault_thread_request lines (every fault read)
    requests: int               # pages asked of the source (postcopy_page_req_add)
    latencies_ms: list[float]   # fault read by the fault thread -> page placed
    request_ms: list[float]     # request queued for sending -> page placed
    early_ms: list[float] = field(default_factory=list)  # latencies_ms of faults in the first early_s
    early_s: float = EARLY_S

    def to_dict(self) -> dict[str, Any]:
        return {"faults": self.faults, "requests": self.requests, "resolved": len(self.latencies_ms),
                **_dist(self.latencies_ms), "from_request": _dist(self.request_ms),
                "early": {"seconds": self.early_s, "requests": len(self.early_ms), **_dist(self.early_ms)}}


def _dist(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    return {"p50_ms": percentile(values, 50), "p90_ms": percentile(values, 90),
            "p99_ms": percentile(values, 99), "max_ms": max(values), "mean_ms": statistics.fmean(values)}


def daemon_requests(latency_log: str, faults: int, resume_ns: int | None = None,
                    early_s: float = EARLY_S) -> PageRequests:
    """The same numbers from ``umemd pull --latency-log`` (umem): one line per page asked of the
    source, when its fault was read (Unix time, the destination's clock, like RESUME's
    timestamp) and how long until it was filled. There is no separate request stage."""
    latencies: list[float] = []
    early: list[float] = []
    early_end = None if resume_ns is None else resume_ns / 1e9 + early_s
    for line in latency_log.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        at, micros = line.split()
        latencies.append(int(micros) / 1000)
        if early_end is not None and float(at) <= early_end:
            early.append(int(micros) / 1000)
    return PageRequests(faults, len(latencies), latencies, latencies, early, early_s)


def page_requests(trace: str, resume_ns: int | None = None, early_s: float = EARLY_S,
                  page_size: int = PAGE_SIZE) -> PageRequests:
    """Each requested page: from the fault thread's read of its (latest) fault, or
    from its request, to its placement (the matching ``postcopy_page_req_del``).
    Faults on pages already received make no request and are not counted.

    ``resume_ns``: the destination's RESUME event timestamp (the same clock as
    the trace); requests whose fault came within ``early_s`` of it are also
    reported apart (``early``)."""
    last_fault: dict[int, int] = {}
    pending: dict[int, tuple[int, int]] = {}
    latencies: list[float] = []
    from_request: list[float] = []
    early: list[float] = []
    early_end_us = None if resume_ns is None else resume_ns // 1000 + int(early_s * 1e6)
    faults = requests = 0
    for line in trace.splitlines():
        m = _TRACE.match(line.strip())
        a = _ADDR.search(m["rest"]) if m else None
        if not m or not a:
            continue
        t_us = _trace_time_us(m)
        page = (0 if a[1] == "(nil)" else int(a[1], 16)) & ~(page_size - 1)
        event = m["event"]
        if event == "postcopy_ram_fault_thread_request":
            faults += 1
            if page not in pending:
                last_fault[page] = t_us
        elif event == "postcopy_page_req_add":
            requests += 1
            if page not in pending:
                pending[page] = (last_fault.pop(page, t_us), t_us)
        elif event == "postcopy_page_req_del" and page in pending:
            fault_us, req_us = pending.pop(page)
            latencies.append((t_us - fault_us) / 1000)
            from_request.append((t_us - req_us) / 1000)
            if early_end_us is not None and fault_us <= early_end_us:
                early.append((t_us - fault_us) / 1000)
    return PageRequests(faults, requests, latencies, from_request, early, early_s)


def qemu_latency(info: dict[str, Any]) -> dict[str, float | int] | None:
    """The destination's own request latency (``query-migrate``, QEMU 10.1+): the mean, and the
    p50/p99 as upper bounds of ``postcopy-latency-dist``'s buckets ([2^N, 2^(N+1)) µs); None
    where QEMU does not report it (10.0, or no post-copy)."""
    if info.get("postcopy-latency") is None:
        return None
    counts = {2 ** (n + 1): c for n, c in enumerate(info.get("postcopy-latency-dist") or [])}
    return {"requests": sum(counts.values()), "mean_ms": info["postcopy-latency"] / 1e6,
            "p50_ms": bucket_percentile(counts, 0.5) / 1e3, "p99_ms": bucket_percentile(counts, 0.99) / 1e3}


@dataclass
class Heartbeats:
    switch_gap_ms: float | None   # last source heartbeat -> first destination heartbeat
    max_gap_ms: float | None      # longest gap from the last source heartbeat on
    dst_max_gap_ms: float | None  # longest gap between destination heartbeats only
    dst_count: int
    seq_continuous: bool          # the destination's first seq follows the source's last

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def heartbeat_gaps(src: WorkloadLog, dst: WorkloadLog) -> Heartbeats:
    """Gaps in guest ``CLOCK_MONOTONIC``, which does not advance while the guest is
    stopped (TCG's TSC and HPET follow the VM clock, migrated with it): the
    destination's heartbeats continue the source's time line, and a gap is time
    the running guest could not print, i.e. a stall after the switch-over."""
    dst_ts = [t for _, t in dst.heartbeats]
    dst_gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(dst_ts)]
    switch = None
    if src.heartbeats and dst.heartbeats:
        switch = (dst.heartbeats[0][1] - src.heartbeats[-1][1]) / 1e6
    gaps = dst_gaps + ([switch] if switch is not None else [])
    return Heartbeats(
        switch_gap_ms=switch,
        max_gap_ms=max(gaps) if gaps else None,
        dst_max_gap_ms=max(dst_gaps) if dst_gaps else None,
        dst_count=len(dst_ts),
        seq_continuous=bool(src.heartbeats and dst.heartbeats
                            and dst.heartbeats[0][0] == src.heartbeats[-1][0] + 1))


def offset_at(before: ClockSample, after: ClockSample, host_ns: int) -> float:
    """The remote clock's offset at ``host_ns``, linear between two samples (drift)."""
    if after.host_ns == before.host_ns:
        return float(before.offset_ns)
    slope = (after.offset_ns - before.offset_ns) / (after.host_ns - before.host_ns)
    return before.offset_ns + slope * (host_ns - before.host_ns)


def event_interval(src_ts_ns: int, dst_ts_ns: int, before: ClockSample, after: ClockSample) -> dict[str, float]:
    """Source event (host clock) -> destination event (remote clock), in host time.

    The remote timestamp is brought to the host clock with the offset measured
    by agent round trips before and after the run (interpolated); the error is
    at most half the round trip of the samples plus what the interpolation
    misses of the drift."""
    dst_host = dst_ts_ns - offset_at(before, after, dst_ts_ns - before.offset_ns)
    return {
        "ms": (dst_host - src_ts_ns) / 1e6,
        "uncertainty_ms": max(before.uncertainty_ns, after.uncertainty_ns) / 1e6,
        "drift_ms": (after.offset_ns - before.offset_ns) / 1e6,
    }


def summary(values: list[float | None]) -> dict[str, float | int | None]:
    """Median, min, max of the runs that have the value."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
