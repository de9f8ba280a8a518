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


TOTAL = _get("total_ms", scale=1e-3)
STOP_RESUME = _get("stop_resume_ms")
STALL = _get("max_hb_gap_ms", scale=1e-3)
P50 = _get("page_requests", "p50_ms")
P99 = _get("page_requests", "p99_ms")
BYTES = _get("bytes", scale=1e-6)

# (label, getter, format, which modes: "all", "postcopy" or "precopy")
ROWS: list[tuple[str, Getter, str, str]] = [
    ("total time, s (source `total-time`; umem: `migrate` → the pull's last fill)", TOTAL, "{:.1f}", "all"),
    ("STOP→RESUME, ms (QMP events, source → destination)", STOP_RESUME, "{:.0f}", "all"),
    # For post-copy QEMU 10.0 reports the switch-over in whole ms and, when
    # that rounds to 0, overwrites it with the whole post-copy phase at
    # completion (migration_downtime_end): meaningless there.
    ("source-reported downtime, ms (`downtime`)", _get("src_downtime_ms"), "{:.0f}", "precopy"),
    ("longest guest heartbeat gap after switch-over, s", STALL, "{:.1f}", "all"),
    ("page requests (asked of the source)", _get("page_requests", "requests"), "{:.0f}", "postcopy"),
    ("page-request latency p50, ms", P50, "{:.1f}", "postcopy"),
    ("page-request latency p99, ms", P99, "{:.0f}", "postcopy"),
    (f"page-request latency p50, ms, faults in the first {EARLY_S:.0f} s after RESUME",
     _get("page_requests", "early", "p50_ms"), "{:.1f}", "postcopy"),
    ("page-request latency by QEMU itself, mean, ms (`postcopy-latency`)", _get("qemu_latency", "mean_ms"),
     "{:.1f}", "postcopy"),
    ("page-request latency by QEMU itself, p50, ms (`postcopy-latency-dist`: its bucket's bound)",
     _get("qemu_latency", "p50_ms"), "{:.1f}", "postcopy"),
    ("page-request latency by QEMU itself, p99, ms (the same)", _get("qemu_latency", "p99_ms"), "{:.0f}",
     "postcopy"),
    ("postcopy blocktime, s (`postcopy-blocktime`)", _get("blocktime_ms", scale=1e-3), "{:.1f}", "postcopy"),
    ("bytes on the wire, MB (`ram.transferred`; umem: + the page channel)", BYTES, "{:.0f}", "all"),
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


# The link-limit column (bench/link.py): the probe's figure in the row of each getter.
LINK_STREAM_S = _get("stream", "seconds")
LINK_RTT_P50 = _get("round_trip", "p50_ms")
LINK_CELLS: dict[Getter, Getter] = {
    TOTAL: LINK_STREAM_S, P50: LINK_RTT_P50, P99: _get("round_trip", "p99_ms"),
    BYTES: _get("stream", "bytes", scale=1e-6),
}
LINK_TITLE = "link limit (raw TCP)"


def _ratios(records: list[dict[str, Any]], links: list[dict[str, Any]], get: Getter,
            link_get: Getter) -> list[float | None]:
    """Per round: the mode's figure over the link probe's of the same round (ratios within one run)."""
    by_index = {k["index"]: link_get(k) for k in links if k.get("ok")}
    out: list[float | None] = []
    for r in records:
        v, lv = get(r), by_index.get(r["index"])
        out.append(v / lv if v is not None and lv else None)
    return out


def completed(rs: list[dict[str, Any]]) -> str:
    ok = [r for r in rs if r.get("ok")]
    capped = [r for r in ok if r.get("converged") is False]
    cell = f"{len(ok)} / {len(rs)}"
    if capped:
        cell += f" ({len(capped)} not converged in {capped[0]['precopy_cap_s']:.0f} s)"
    return cell


def table(records: list[dict[str, Any]], modes: list[tuple[str, str, bool]],
          links: list[dict[str, Any]] | None = None) -> str:
    """``modes``: (name, title, postcopy) in column order; with ``links`` (the probes of the same
    rounds) a last column with the link's own figures and two rows of ratios to them."""
    by_mode = {name: [r for r in records if r["mode"] == name] for name, _, _ in modes}
    # A pre-copy cancelled at its cap has no timings: only its bytes and verification count.
    ok = {name: [r for r in rs if r.get("ok")] for name, rs in by_mode.items()}
    timed = {name: [r for r in rs if r.get("converged") is not False] for name, rs in ok.items()}
    good_links = [k for k in links or [] if k.get("ok")]
    titles = [t for _, t, _ in modes] + ([LINK_TITLE] if links is not None else [])
    lines = ["| median (min-max) of the runs | " + " | ".join(titles) + " |", "| --- |" + " ---: |" * len(titles)]

    def row(label: str, cells: list[str], link_cell: str = "n/a") -> None:
        lines.append(f"| {label} | " + " | ".join(cells + ([link_cell] if links is not None else [])) + " |")

    for label, get, fmt, only in ROWS:
        pool = ok if get is BYTES else timed
        cells = [(cell([get(r) for r in pool[name]], fmt) if _applies(only, pc) else "n/a")
                 for name, _, pc in modes]
        link_get = LINK_CELLS.get(get)
        row(label, cells, cell([link_get(k) for k in good_links], fmt) if link_get else "n/a")
    if links is not None:
        row("total time ÷ the raw stream's time, same round",
            [cell(_ratios(timed[n], good_links, TOTAL, LINK_STREAM_S), "{:.2f}") for n, _, _ in modes])
        row("page-request latency p50 ÷ the raw round trip's p50, same round",
            [cell(_ratios(timed[n], good_links, P50, LINK_RTT_P50), "{:.1f}") if pc else "n/a"
             for n, _, pc in modes])
    fails = []
    for name, _, _ in modes:
        done = [r for r in by_mode[name] if "verify_failures" in r]
        fails.append(f"{sum(r['verify_failures'] for r in done)} in {len(done)} runs" if done else "—")
    row("verify failures (BAD pages, all passes, both sides)", fails)
    row("runs completed / run", [completed(by_mode[n]) for n, _, _ in modes],
        f"{len(good_links)} / {len(links or [])}")
    return "\n".join(lines)


# The by-size table: (heading, getter, format) per column, for each (size, mode).
GROWTH_COLUMNS: list[tuple[str, Getter, str]] = [
    ("total, s", TOTAL, "{:.1f}"),
    ("STOP→RESUME, ms", STOP_RESUME, "{:.0f}"),
    ("longest stall, s", STALL, "{:.1f}"),
    ("p50, ms", P50, "{:.1f}"),
    ("p99, ms", P99, "{:.0f}"),
    ("MB on the wire", BYTES, "{:.0f}"),
]


def growth_table(result: dict[str, Any]) -> str:
    """Medians by guest size and mode, with each mode's total over the link's and over its own
    total at the smallest size: which mode's cost grows fastest."""
    heads = ["guest RAM", "mode", *(h for h, _, _ in GROWTH_COLUMNS), "total ÷ raw stream",
             f"total ÷ its own at {result['sizes'][0]['ram']}"]
    lines = ["| " + " | ".join(heads) + " |", "| --- | --- |" + " ---: |" * (len(heads) - 2)]
    first: dict[str, float | None] = {}
    for size in (x["ram"] for x in result["sizes"]):
        links = [k for k in result.get("links", []) if k["guest_ram"] == size and k.get("ok")]
        for m in result["modes"]:
            rs = [r for r in result["records"] if r.get("guest_ram") == size and r["mode"] == m["name"]
                  and r.get("ok")]
            timed = [r for r in rs if r.get("converged") is not False]
            if not timed:
                lines.append(f"| {size} | {m['title']} | " + " | ".join(
                    ["not converged" if rs else "—"] + ["—"] * (len(heads) - 3)) + " |")
                continue
            cells = [cell([g(r) for r in timed], f) if m["postcopy"] or g not in (P50, P99) else "n/a"
                     for _, g, f in GROWTH_COLUMNS]
            total = summary([TOTAL(r) for r in timed])["median"]
            if size == result["sizes"][0]["ram"]:
                first[m["name"]] = total
            base = first.get(m["name"])
            cells.append(cell(_ratios(timed, links, TOTAL, LINK_STREAM_S), "{:.2f}"))
            cells.append(f"{total / base:.2f}" if total is not None and base else "—")
            lines.append(f"| {size} | {m['title']} | " + " | ".join(cells) + " |")
        if links:
            cells = [cell([LINK_CELLS[g](k) for k in links], f) if g in LINK_CELLS else "n/a"
                     for _, g, f in GROWTH_COLUMNS]
            lines.append(f"| {size} | {LINK_TITLE} | " + " | ".join(cells) + " | 1.00 | |")
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


def sizes_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The guest sizes of a result (one, in results from before the race took several)."""
    return list(result.get("sizes") or [result["settings"]])


def tables(result: dict[str, Any]) -> str:
    """One table per guest size (with the link column when the run probed the link), then, with
    more than one size, the table by size."""
    modes = [(x["name"], x["title"], x["postcopy"]) for x in result["modes"]]
    several = len(sizes_of(result)) > 1
    parts = []
    for s in sizes_of(result):
        records = [r for r in result["records"] if r.get("guest_ram", s["ram"]) == s["ram"]]
        links = [k for k in result["links"] if k["guest_ram"] == s["ram"]] if "links" in result else None
        if several:
            parts.append(f"**{s['ram']} of guest RAM, {s['mib']} MiB workload**")
        parts.append(table(records, modes, links or None))
    if several:
        parts += ["**By size** (medians; ratios per round, then their median)", growth_table(result)]
    return "\n\n".join(parts)


def link_note(result: dict[str, Any]) -> str:
    links = [k for k in result.get("links", []) if k.get("ok")]
    if not links:
        return ""
    k = links[0]
    return (f" The link-limit column: through the migration's own forward, between two rounds, a raw TCP stream "
            f"of as many bytes as {k['bytes_of']} (`sendfile`, timed from connect to the receiver's last "
            f"byte) and {k['round_trip']['rounds']} request/response round trips of one page each, "
            "requested from the destination side (bench/link.py).")


def block(result: dict[str, Any], doc: DocBlock) -> str:
    """The generated part of the section: command, date, machine, tables."""
    m = result["machine"]
    load_end = result.get("loadavg_end")
    guests = ", ".join(f"{s['ram']} RAM with a {s['mib']} MiB workload" for s in sizes_of(result))
    accel = result.get("topology", {}).get("dst_accel", "tcg")
    about = (
        f"Run of {result['date']} ({result['seconds'] / 60:.0f} min), topology `{result['topology']['name']}`, "
        f"destination under {accel.upper()}, {result['runs']} runs per mode (modes interleaved). Machine: "
        f"{m['os']}, {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB, kernel {m['kernel']}; load average "
        f"{m['loadavg'][0]:.2f} at the start" + (f", {load_end[0]:.2f} at the end" if load_end else "")
        + f". Both QEMUs: {result['qemu']} (`{result['qemu_binary']}`). Guest: {guests}. Raw results: "
        f"`{result['json']}`." + link_note(result))
    return doc.wrap("\n\n".join([f"    {result['command']}",
                                  textwrap.fill(about, 100, break_on_hyphens=False, break_long_words=False),
                                  tables(result)]))
