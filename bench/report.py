"""The benchmark's table: medians with ranges per mode, Markdown, and its section in
docs/performance.md (only the generated block between the markers is replaced)."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .docblock import DocBlock
from .metrics import EARLY_S, summary

BLOCKS = {
    "baseline": DocBlock("## QEMU migration baseline (upstream, end-to-end topology)", "bench-baseline"),
    "race": DocBlock("## The race: umem against upstream, end to end", "bench-e2e"),
}

Getter = Callable[[dict[str, Any]], float | None]


def _get(*path: str, scale: float = 1.0) -> Getter:
    def get(record: dict[str, Any]) -> float | None:
        v: Any = record
        for key in path:
            if not isinstance(v, dict) or v.get(key) is None:
                return None
            v = v[key]
        return float(v) * scale
    return get


# (label, getter, format, which modes: "all", "postcopy" or "precopy")
ROWS: list[tuple[str, Getter, str, str]] = [
    ("total time, s (source `total-time`; umem: `migrate` → the pull's last fill)", _get("total_ms", scale=1e-3),
     "{:.1f}", "all"),
    ("STOP→RESUME, ms (QMP events, source → destination)", _get("stop_resume_ms"), "{:.0f}", "all"),
    # For post-copy QEMU 10.0 reports the switch-over in whole ms and, when
    # that rounds to 0, overwrites it with the whole post-copy phase at
    # completion (migration_downtime_end): meaningless there.
    ("source-reported downtime, ms (`downtime`)", _get("src_downtime_ms"), "{:.0f}", "precopy"),
    ("longest guest heartbeat gap after switch-over, s", _get("max_hb_gap_ms", scale=1e-3), "{:.1f}", "all"),
    ("page requests (asked of the source)", _get("page_requests", "requests"), "{:.0f}", "postcopy"),
    ("page-request latency p50, ms", _get("page_requests", "p50_ms"), "{:.1f}", "postcopy"),
    ("page-request latency p99, ms", _get("page_requests", "p99_ms"), "{:.0f}", "postcopy"),
    (f"page-request latency p50, ms, faults in the first {EARLY_S:.0f} s after RESUME",
     _get("page_requests", "early", "p50_ms"), "{:.1f}", "postcopy"),
    ("postcopy blocktime, s (`postcopy-blocktime`)", _get("blocktime_ms", scale=1e-3), "{:.1f}", "postcopy"),
    ("bytes on the wire, MB (`ram.transferred`; umem: + the page channel)", _get("bytes", scale=1e-6), "{:.0f}",
     "all"),
    ("of which after switch-over, MB (`postcopy-bytes`)", _get("ram", "postcopy-bytes", scale=1e-6), "{:.0f}",
     "postcopy"),
]


def _applies(only: str, postcopy: bool) -> bool:
    return only == "all" or (only == "postcopy") == postcopy


def cell(values: list[float | None], fmt: str) -> str:
    s = summary(values)
    if s["median"] is None:
        return "—"
    med, lo, hi = (fmt.format(s[k]) for k in ("median", "min", "max"))
    return med if lo == hi else f"{med} ({lo}-{hi})"


def table(records: list[dict[str, Any]], modes: list[tuple[str, str, bool]]) -> str:
    """``modes``: (name, title, postcopy) in column order."""
    by_mode = {name: [r for r in records if r["mode"] == name] for name, _, _ in modes}
    ok = {name: [r for r in rs if r.get("ok")] for name, rs in by_mode.items()}
    head = "| median (min-max) of the runs | " + " | ".join(t for _, t, _ in modes) + " |"
    lines = [head, "| --- |" + " ---: |" * len(modes)]
    for label, get, fmt, only in ROWS:
        cells = [(cell([get(r) for r in ok[name]], fmt) if _applies(only, pc) else "n/a")
                 for name, _, pc in modes]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    fails = []
    for name, _, _ in modes:
        done = [r for r in by_mode[name] if "verify_failures" in r]
        fails.append(f"{sum(r['verify_failures'] for r in done)} in {len(done)} runs" if done else "—")
    lines.append("| verify failures (BAD pages, all passes, both sides) | " + " | ".join(fails) + " |")
    lines.append("| runs completed / run | " + " | ".join(f"{len(ok[n])} / {len(by_mode[n])}"
                                                         for n, _, _ in modes) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])  # type: ignore[index]
        mem_gib = round(kb / 2**20)
    except (OSError, TypeError):
        pass
    distro = "?"
    with contextlib.suppress(OSError, TypeError):
        distro = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text())[1]  # type: ignore[index]
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": mem_gib, "kernel": platform.release(),
            "os": distro, "loadavg": os.getloadavg()}


def qemu_version(binary: str) -> str:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30).stdout
        return out.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def block(result: dict[str, Any], doc: DocBlock) -> str:
    """The generated part of the section: command, date, machine, table."""
    m = result["machine"]
    modes = [(x["name"], x["title"], x["postcopy"]) for x in result["modes"]]
    load_end = result.get("loadavg_end")
    about = (
        f"Run of {result['date']} ({result['seconds'] / 60:.0f} min), topology `{result['topology']['name']}`, "
        f"{result['runs']} runs per mode (modes interleaved). Machine: {m['os']}, {m['cpu']}, {m['cores']} "
        f"cores, {m['mem_gib']} GiB, kernel {m['kernel']}; load average {m['loadavg'][0]:.2f} at the start"
        + (f", {load_end[0]:.2f} at the end" if load_end else "")
        + f". Both QEMUs: {result['qemu']} (`{result['qemu_binary']}`). Guest: {result['settings']['ram']} "
        f"RAM, {result['settings']['mib']} MiB workload. Raw results: `{result['json']}`.")
    return doc.wrap("\n\n".join([f"    {result['command']}",
                                  textwrap.fill(about, 100, break_on_hyphens=False, break_long_words=False),
                                  table(result["records"], modes)]))
