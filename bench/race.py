"""python -m bench.race: QEMU migration modes side by side in the end-to-end topology.

The upstream three by default (``make bench-baseline``); with ``--modes
precopy,postcopy,postcopy-preempt,umem --section race`` the four-way race of
``make bench-e2e``. Boots the test VM once (destination side, see tests/harness/topology.py;
the destination QEMU under KVM there by default, nested), then for each guest size of
``--ram`` runs every mode ``--runs`` times, interleaved (pre-copy 1, postcopy 1, preempt 1,
pre-copy 2, ...), each with a fresh source and destination QEMU, and after each round the
link's own limit through the same forward (bench/link.py); prints medians with ranges,
writes the raw records as JSON and the tables as Markdown, and with ``--update-doc``
replaces the generated block of the ``--section`` in docs/performance.md. Never part of
``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tests.harness import CHECKOUT
from tests.harness.machine import Settings, guest_image, qemu_binary
from tests.harness.topology import HostTopology, Topology, VmTopology
from umemd.cli import parse_size
from umemd.protocol import PAGE_SIZE

from . import link, report
from .docblock import update_doc
from .modes import MODES as UPSTREAM_MODES
from .modes import Mode
from .run import run_once
from .umem_mode import UmemMode

MODES: dict[str, type[Mode]] = {**UPSTREAM_MODES, UmemMode.name: UmemMode}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.race", description=__doc__.splitlines()[0])
    p.add_argument("--topology", choices=("vm", "host"), default="vm",
                   help="vm: destination inside the test VM (default); host: both on the host (reference)")
    p.add_argument("--modes", default=",".join(UPSTREAM_MODES),
                   help=f"comma-separated, from {', '.join(MODES)} (default: the upstream three)")
    p.add_argument("--runs", type=int, default=3, help="runs per mode (default 3)")
    p.add_argument("--ram", default="512M",
                   help="guest RAM, or comma-separated sizes raced one after the other (default 512M; "
                   "the issue's race: 512M,1G,2G)")
    p.add_argument("--mib", type=int,
                   help=f"workload MiB (default: {WORKLOAD_SHARE:.0%} of the guest's RAM, 192 at 512M); "
                   "the hot set (wl_hot_mib) stays the guest's default")
    p.add_argument("--dst-accel", choices=("kvm", "tcg"), default="kvm",
                   help="the destination QEMU's accelerator in the test VM (default kvm: nested, under the "
                   "test VM's emulated SVM; both guests then get the cross-accelerator CPU and clock)")
    p.add_argument("--precopy-cap", type=float, default=300, metavar="S",
                   help="pre-copy still running after S seconds is cancelled and reported as not converged "
                   "(default 300)")
    p.add_argument("--vm-memory", help="the test VM's RAM (default: 2 x the largest guest + 2 GiB, at least 4G)")
    p.add_argument("--no-link", action="store_true", help="leave out the link-limit probes")
    p.add_argument("--postcopy-after", type=float, default=0.0, metavar="S",
                   help="seconds of pre-copy before migrate-start-postcopy (default 0: at once)")
    p.add_argument("--passes-after", type=int, default=2,
                   help="destination verification passes required after completion (default 2)")
    p.add_argument("--vm-timeout", type=float, default=5400,
                   help="wall-clock limit of the test VM, seconds (default 5400)")
    p.add_argument("--workdir", type=Path, default=CHECKOUT / "build" / "bench-baseline",
                   help="per-run logs (default build/bench-baseline)")
    p.add_argument("--out", type=Path, default=CHECKOUT / "build" / "bench-baseline.json",
                   help="raw results (default build/bench-baseline.json); the table goes next to it as .md")
    p.add_argument("--update-doc", type=Path, metavar="MARKDOWN",
                   help="replace the generated block of --section in this file")
    p.add_argument("--section", choices=report.BLOCKS, default="baseline",
                   help="which section --update-doc writes: baseline (upstream modes, make bench-baseline) or "
                   "race (with umem, make bench-e2e)")
    p.add_argument("--command", help="the command line to record in the results (default: this one)")
    p.add_argument("--from-json", type=Path, metavar="JSON",
                   help="no runs: print (and with --update-doc record) the table of an earlier result")
    return p.parse_args(argv)


WORKLOAD_SHARE = 0.375  # of the guest's RAM: 192 MiB at 512 MiB, as the race always had


def sizes(args: argparse.Namespace) -> list[Settings]:
    """One :class:`Settings` per guest size of ``--ram``."""
    out = []
    for ram in (r.strip() for r in args.ram.split(",") if r.strip()):
        mib = args.mib or round(parse_size(ram) / (1 << 20) * WORKLOAD_SHARE)
        out.append(Settings(ram=ram, mib=mib, passes_after=args.passes_after,
                            postcopy_after_s=args.postcopy_after, precopy_cap_s=args.precopy_cap))
    return out


def vm_memory(args: argparse.Namespace, settings: list[Settings]) -> str:
    """The test VM holds the destination guest (and, for umem, its device's pages) and tmpfs logs."""
    if args.vm_memory:
        return str(args.vm_memory)
    largest = max(parse_size(s.ram) for s in settings)
    return f"{max(4 << 30, 2 * largest + (2 << 30)) >> 20}M"


def make_topology(args: argparse.Namespace, modes: list[Mode], settings: list[Settings]) -> Topology:
    extra: dict[str, int] = {}
    vm_args: list[str] = ["--memory", vm_memory(args, settings)]
    for m in modes:
        extra.update(m.extra_ports)
        vm_args += [a for a in m.vm_args if a not in vm_args]
    if args.topology == "host":
        if args.dst_accel != "tcg":
            raise SystemExit("--topology host runs the destination on this host, whose KVM boots no guest: "
                             "add --dst-accel tcg")
        return HostTopology(args.workdir, extra)
    return VmTopology(args.workdir, extra, timeout=args.vm_timeout, vm_args=vm_args, dst_accel=args.dst_accel)


def log(msg: str) -> None:
    print(f"[bench-baseline {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_line(rec: dict[str, Any]) -> str:
    if not rec.get("ok"):
        why = rec.get("error") or rec.get("problems")
        return f"{rec['mode']} #{rec['index']}: FAILED after {rec['seconds']} s: {why}"
    if rec.get("converged") is False:
        return (f"{rec['mode']} #{rec['index']}: not converged in {rec['precopy_cap_s']:.0f} s, cancelled "
                f"({rec['bytes'] / 1e6:.0f} MB sent), bad {rec['verify_failures']}")
    pr = rec.get("page_requests") or {}
    parts = [f"total {rec['total_ms'] / 1000:.2f} s",
             f"STOP->RESUME {rec['stop_resume_ms']:.0f} ms" if rec.get("stop_resume_ms") is not None else "",
             f"hb gap {rec['max_hb_gap_ms'] / 1000:.2f} s" if rec.get("max_hb_gap_ms") is not None else "",
             f"{pr['requests']} req p50 {pr['p50_ms']:.1f} ms p99 {pr['p99_ms']:.0f} ms" if pr.get("p50_ms") else "",
             f"blocktime {rec['blocktime_ms']} ms" if rec.get("blocktime_ms") is not None else "",
             f"{rec['bytes'] / 1e6:.0f} MB", f"bad {rec['verify_failures']}", f"({rec['seconds']} s)"]
    return f"{rec['mode']} #{rec['index']}: " + ", ".join(p for p in parts if p)


async def bench(args: argparse.Namespace, modes: list[Mode], command: str) -> dict[str, Any]:
    settings = sizes(args)
    binary = qemu_binary()
    if not binary.exists():
        raise SystemExit(f"{binary} does not exist: run `make qemu` first")
    guest = guest_image()
    result: dict[str, Any] = {
        "command": command, "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": report.machine(),
        "qemu": report.qemu_version(str(binary)), "qemu_binary": str(binary.resolve()),
        "settings": settings[0].__dict__, "sizes": [s.__dict__ for s in settings], "runs": args.runs,
        "modes": [{"name": m.name, "title": m.title, "postcopy": m.postcopy} for m in modes],
        "json": str(args.out.relative_to(CHECKOUT) if args.out.is_relative_to(CHECKOUT) else args.out),
        "records": [], "links": [],
    }
    t0 = time.monotonic()
    topo = make_topology(args, modes, settings)
    log(f"starting the {topo.name} topology (the test VM boots in ~10-30 s), destination under {topo.dst_accel}")
    async with topo:
        result["topology"] = topo.describe()
        log(f"agent up: {topo.agent.hello}")
        for s in settings:
            for i in range(1, args.runs + 1):
                for mode in modes:
                    log(f"{s.ram}: {mode.name} #{i} ...")
                    rec = await run_once(topo, mode, guest, s, i, args.workdir / s.ram / f"{mode.name}-{i}")
                    rec.update(guest_ram=s.ram, mib=s.mib)
                    result["records"].append(rec)
                    log(run_line(rec))
                    save(args.out, result)
                if not args.no_link:
                    result["links"].append(await link_round(topo, s, i, result["records"], args.workdir))
                    log(link_line(result["links"][-1]))
                    save(args.out, result)
    result["seconds"] = time.monotonic() - t0
    result["loadavg_end"] = report.machine()["loadavg"]
    save(args.out, result)
    return result


def stream_bytes(records: list[dict[str, Any]], s: Settings, index: int) -> tuple[int, str]:
    """As many bytes as post-copy moved that are not zero pages (QEMU's ``normal`` pages) in
    this round; without a post-copy run, the workload's size."""
    for r in records:
        normal = (r.get("ram") or {}).get("normal")
        if r["mode"] == "postcopy" and r.get("guest_ram") == s.ram and r["index"] == index and normal:
            return int(normal) * PAGE_SIZE, "postcopy's non-zero pages"
    return s.mib << 20, "the workload's size"


async def link_round(topo: Topology, s: Settings, index: int, records: list[dict[str, Any]],
                     workdir: Path) -> dict[str, Any]:
    size, what = stream_bytes(records, s, index)
    rec: dict[str, Any] = {"guest_ram": s.ram, "index": index, "bytes_of": what}
    try:
        rec.update(await link.probe(topo, link.stream_file(workdir / "link", size)))
        rec["ok"] = True
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {e}")
    return rec


def link_line(rec: dict[str, Any]) -> str:
    if not rec["ok"]:
        return f"link #{rec['index']}: FAILED: {rec['error']}"
    st, rt = rec["stream"], rec["round_trip"]
    return (f"link #{rec['index']}: raw stream {st['bytes'] / 1e6:.0f} MB in {st['seconds']:.2f} s "
            f"({st['mb_per_s']:.0f} MB/s), {rt['rounds']} round trips of a page p50 {rt['p50_ms']:.2f} ms "
            f"p99 {rt['p99_ms']:.2f} ms")


def save(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        names = [n.strip() for n in args.modes.split(",") if n.strip()]
        unknown = [n for n in names if n not in MODES]
        if unknown:
            raise SystemExit(f"unknown mode(s): {', '.join(unknown)}; known: {', '.join(MODES)}")
        modes = [MODES[n]() for n in names]
        command = args.command or "python -m bench.race " + shlex.join(argv)
        result = asyncio.run(bench(args, modes, command))
    doc = report.BLOCKS[args.section]
    generated = report.block(result, doc)
    md = args.out.with_suffix(".md") if not args.from_json else args.from_json.with_suffix(".md")
    md.write_text(generated + "\n")
    print()
    print(report.tables(result))
    print(f"\nraw results: {args.out if not args.from_json else args.from_json}; table: {md}")
    ok = bool(result["records"]) and all(r.get("ok") for r in result["records"] + result.get("links", []))
    if args.update_doc and ok:
        update_doc(args.update_doc, generated, doc)
        print(f"updated the section {doc.section!r} of {args.update_doc}")
    elif args.update_doc:
        print(f"some runs failed: {args.update_doc} left as it was", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
