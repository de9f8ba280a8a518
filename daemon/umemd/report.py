"""``umemd migrate``'s report: the ``--report`` JSON, the summary it prints and the ``--plot``
(matplotlib), from the pull's status lines over time (:class:`Timeline`) and both QEMUs' last
``query-migrate``."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umemd.protocol import PAGE_SIZE
from umemd.stats import bucket_bound, bucket_percentile


@dataclass
class Timeline:
    """What the pull daemon reported over time (seconds since ``migrate``)."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)  # event -> seconds since migrate

    def add(self, t: float, status: dict[str, Any]) -> None:
        self.samples.append({"t": round(t, 3), "present": status["present"], "faults": status["faults"],
                             "demand_pages": status["demand_pages"], "pushed_pages": status["pushed_pages"],
                             "zero_pages": status["zero_pages"],
                             "latency": status["fault_latency_us"]["histogram"]})


def build_report(ready: dict[str, Any], last: dict[str, Any], src_info: dict[str, Any], dst_info: dict[str, Any],
                 stop: float | None, resume: float | None, started: float, finished: float,
                 timeline: Timeline) -> dict[str, Any]:
    """The ``--report`` document; ``stop`` and ``resume``: when the source's STOP and the
    destination's RESUME arrived (``time.monotonic()``), if they did."""
    ram = src_info.get("ram", {})
    return {
        "instance": ready["name"],
        "node": ready["node"],
        "migration_id": ready["migration_id"],
        "stop_resume_ms": round((resume - stop) * 1000, 1) if stop and resume else None,
        "total_s": round(finished - started, 3),
        "qemu": {"total_ms": src_info.get("total-time"), "setup_ms": src_info.get("setup-time"),
                 "ram_bytes": ram.get("transferred"), "ram_total": ram.get("total"),
                 "destination_status": dst_info.get("status")},
        "pages": {"total": last["pages"], "present": last["present"], "faults": last["faults"],
                  "demanded": last["demand_pages"], "pushed": last["pushed_pages"],
                  "zero_hints": last["zero_pages"], "already_present": last["skipped_pages"]},
        "bytes_received": last["bytes_received"],
        "reconnects": last["reconnects"],
        "daemon_attached": last["attached"],  # the pull that finished had restarted and attached
        "fault_latency_us": last["fault_latency_us"],
        "timeline": {"marks": {k: round(v, 3) for k, v in timeline.marks.items()}, "samples": timeline.samples},
    }


def summary(report: dict[str, Any]) -> str:
    p, q, lat = report["pages"], report["qemu"], report["fault_latency_us"]
    stop_resume = f"{report['stop_resume_ms']:.0f} ms" if report["stop_resume_ms"] is not None else "not seen"
    return "\n".join([
        f"migrated {report['instance']} ({p['total']} pages, {p['total'] * PAGE_SIZE / 2**20:.0f} MiB, "
        f"migration {report['migration_id']})",
        f"  STOP->RESUME      {stop_resume}",
        f"  until last page   {report['total_s']:.2f} s",
        f"  migration stream  {q['ram_bytes']} bytes of RAM blocks (device state and ROMs; guest RAM moved by umem)",
        f"  pages             {p['demanded']} demanded by {p['faults']} faults, {p['pushed']} pushed, "
        f"{p['zero_hints']} zero hints (counted in those two), {p['already_present']} already present",
        f"  received          {report['bytes_received'] / 2**20:.1f} MiB, {report['reconnects']} reconnects",
        f"  fault latency     p50 {lat['p50'] / 1000:.2f} ms, p99 {lat['p99'] / 1000:.2f} ms "
        f"(power-of-two buckets; upper bounds)",
    ])


def write_plot(report: dict[str, Any], path: Path) -> None:
    """Pages present, faults per second and fault latency over time, as a PNG."""
    import matplotlib  # a slow import, only for --plot
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, marks = report["timeline"]["samples"], report["timeline"]["marks"]
    total = report["pages"]["total"]
    t = [s["t"] for s in samples]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, sharex=True, figsize=(9, 8))
    ax1.plot(t, [100 * s["present"] / total for s in samples])
    ax1.set_ylabel("pages present (%)")
    rates, p50, p99 = interval_series(samples)
    ax2.step(t[1:], rates, where="pre")
    ax2.set_ylabel("faults / s")
    ax3.step(t[1:], [v / 1000 for v in p50], where="pre", label="p50")
    ax3.step(t[1:], [v / 1000 for v in p99], where="pre", label="p99")
    ax3.set_ylabel("fault latency (ms)")
    ax3.set_xlabel("seconds since migrate")
    ax3.legend()
    for ax in (ax1, ax2, ax3):
        for at in marks.values():
            ax.axvline(at, color="grey", linestyle=":", linewidth=1)
    for name, at in marks.items():
        ax1.annotate(name, (at, 100), rotation=90, fontsize=7, va="top")
    fig.suptitle(f"umem post-copy of {report['instance']}: STOP->RESUME {report['stop_resume_ms']} ms, "
                 f"last page at {report['total_s']} s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def interval_series(samples: list[dict[str, Any]]) -> tuple[list[float], list[float], list[float]]:
    """Per interval between samples: faults per second and latency p50/p99 (µs, bucket upper
    bounds) of the faults served in it, from the difference of the cumulative histograms."""
    rates, p50, p99 = [], [], []
    for before, after in itertools.pairwise(samples):
        dt = max(after["t"] - before["t"], 1e-6)
        rates.append((after["faults"] - before["faults"]) / dt)
        diff = {bucket_bound(k): n - before["latency"].get(k, 0) for k, n in after["latency"].items()}
        p50.append(bucket_percentile(diff, 0.5))
        p99.append(bucket_percentile(diff, 0.99))
    return rates, p50, p99
