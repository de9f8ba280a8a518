"""umemd serve + pull inside the test VM, side by side in one run.

    make bench-daemon

a. push throughput: a pull that no guest touches (every page arrives on the
   push channel), serve start to pull exit, vs a raw TCP stream of the same
   file over the same link (Python sendfile and sendall into recv_into),
   sender start to receiver done; over loopback and over a veth pair into a
   network namespace (unshaped).
b. demand-fault latency seen by a synthetic guest (threads touching random
   missing pages, each access timed) with the push running at full speed vs
   with the push capped at 0.001 MiB/s (demand only).
c. pages that came by faults (demand, pre-paged included) vs pushed, with
   demand pre-paging (serve --prepage 8, the default) and without
   (--prepage 1), for sequential and random guests.

Configurations are interleaved, each run --runs times; the tables show
medians. --out saves every run as JSON, --doc replaces the generated block
of the "Daemon" section in docs/performance.md. The guest helper runs as
``python -m bench.daemon_bench guest ...``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from tests.harness import CHECKOUT
from tests.harness.command import in_netns, umemd_command
from tests.harness.net import veth_namespace
from tests.harness.waiting import wait_until
from umemd.protocol import PAGE_SIZE

from .docblock import DocBlock, update_doc
from .metrics import percentile
from .profile_summary import summarize_profile

LOGS = CHECKOUT / "build" / "bench-daemon-logs"
MIB = 1 << 20
PORT = 4711
NETNS = "umembench"
HERE, THERE = "10.78.0.1", "10.78.0.2"
DOC = DocBlock("## Daemon: push, demand faults, pre-paging", "bench-daemon")
X = "\N{MULTIPLICATION SIGN}"
NAN = float("nan")
NO_PUSH_RATE = "0.001"  # MiB/s: one 1 MiB push frame, then nothing for 1000 s


# ---- helpers run as their own processes ------------------------------------------------


def guest_main(args: argparse.Namespace) -> int:
    """Touch pages of the instance from threads; time each access of a page
    that mincore() says is missing (a demand fault) and print JSON."""
    from tests.harness.mapping import Mapping, libc

    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    size = args.size
    pages = size // PAGE_SIZE
    mapping = Mapping(Path(args.node), size)
    one = ctypes.create_string_buffer(1)
    ctypes.memmove(one, mapping.addr, 1)  # page 0: waits until the demand channel is up
    started = time.monotonic()
    rng = random.Random(args.seed)
    if args.pattern == "sequential":
        starts = [rng.randrange(1, pages - args.touches) for _ in range(args.threads)]
        plan = [[s + i for i in range(args.touches)] for s in starts]
    else:
        picks = rng.sample(range(1, pages), args.threads * args.touches)
        plan = [picks[i::args.threads] for i in range(args.threads)]
    records: list[list[tuple[float, float, bool]]] = [[] for _ in plan]

    def touch(pages_to_touch: list[int], out: list[tuple[float, float, bool]]) -> None:
        vec = ctypes.create_string_buffer(1)
        buf = ctypes.create_string_buffer(1)
        for page in pages_to_touch:
            addr = mapping.addr + page * PAGE_SIZE
            if libc.mincore(addr, PAGE_SIZE, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
            missing = not vec.raw[0] & 1
            t0 = time.perf_counter()
            ctypes.memmove(buf, addr, 1)
            out.append((time.monotonic(), (time.perf_counter() - t0) * 1e6, missing))

    workers = [threading.Thread(target=touch, args=(p, r)) for p, r in zip(plan, records, strict=True)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    flat = [r for rs in records for r in rs]
    json.dump({"started": started, "ended": time.monotonic(), "touches": [[round(t, 6), round(us, 1), m]
                                                                           for t, us, m in flat]}, sys.stdout)
    return 0


# ---- the benchmark -----------------------------------------------------------------------


def py(*args: str, netns: bool = False) -> list[str]:
    command = [sys.executable, *args]
    return in_netns(NETNS, command) if netns else command


class Run:
    """Processes of one measurement, their logs under build/bench-daemon-logs/."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.procs: list[subprocess.Popen[bytes]] = []
        LOGS.mkdir(parents=True, exist_ok=True)

    def spawn(self, kind: str, command: list[str], stdout: int | None = None) -> subprocess.Popen[bytes]:
        log = open(LOGS / f"{self.label}-{kind}.log", "wb")  # noqa: SIM115 (the child holds it)
        proc = subprocess.Popen(command, stdout=stdout or log, stderr=log, cwd=CHECKOUT)
        log.close()
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def present_from(node: str, pull: subprocess.Popen[bytes]) -> float:
    """When the first page of the instance became present (polled every 50 ms)."""
    from umemd import Control

    name = Path(node).name
    with Control() as control:
        while pull.poll() is None:
            if next((i.present for i in control.list() if i.name == name), 0):
                return time.monotonic()
            time.sleep(0.05)
    raise RuntimeError(f"pull exited before any page was present: see {LOGS}")


def must(proc: subprocess.Popen[bytes], what: str, timeout: float = 600) -> None:
    if proc.wait(timeout) != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: see {LOGS}")


class Bench:
    def __init__(self, source: Path, key: Path, *, profile: str | None = None) -> None:
        self.source = source
        self.key = key
        self.size = source.stat().st_size
        self.count = 0
        self.profile = profile  # py-spy the daemons, into build/profile-daemon-<profile>-{pull,serve}.raw

    def umemd(self, kind: str, *args: str, netns: bool = False) -> list[str]:
        command = umemd_command(kind, *args, verbose=True, netns=NETNS if netns else None)
        if not self.profile:
            return command
        out = CHECKOUT / "build" / f"profile-daemon-{self.profile}-{kind}.raw"
        return ["py-spy", "record", "--format", "raw", "--threads", "--rate", "200", "--nonblocking", "-o", str(out),
                "--", *command]

    def _name(self) -> str:
        self.count += 1
        return f"bench{os.getpid()}-{self.count}"

    @property
    def port(self) -> int:
        return PORT + self.count  # a fresh port per run: no TIME_WAIT from the last one

    @contextmanager
    def migration(self, label: str, serve_args: list[str], *, netns: bool = False,
                  ) -> Iterator[tuple[Run, str, subprocess.Popen[bytes], Callable[[], subprocess.Popen[bytes]]]]:
        """A pull listening on the link; yields (run, node, pull, start_serve)."""
        from umemd import Control, InstanceNotFoundError, node_path

        name = self._name()
        migration_id = secrets.token_hex(16)
        run = Run(f"{self.count:02d}-{label}")
        host = HERE if netns else "127.0.0.1"
        report = LOGS / f"{run.label}-pull.json"
        pull = run.spawn("pull", self.umemd("pull", name, "--size", str(self.size), "--listen", f"{host}:{self.port}",
                                            "--key-file", str(self.key), "--migration-id", migration_id,
                                            "--report", str(report), "--quiet"))
        try:
            wait_until(lambda: node_path(name).exists() or pull.poll() is not None, 120, "the instance node")

            def start_serve() -> subprocess.Popen[bytes]:
                return run.spawn("serve", self.umemd("serve", str(self.source), "--connect", f"{host}:{self.port}",
                                                     "--key-file", str(self.key), "--migration-id", migration_id,
                                                     "--guest-stopped-for-good", *serve_args, netns=netns))
            yield run, str(node_path(name)), pull, start_serve
        finally:
            run.close()
            try:
                with Control() as control:
                    control.destroy(name)
            except InstanceNotFoundError:
                pass

    def push(self, netns: bool) -> dict[str, Any]:
        """Every page on the push channel: serve start to pull exit."""
        with self.migration("push-" + ("veth" if netns else "lo"), [], netns=netns) as (run, node, pull, serve):
            t0 = time.monotonic()
            s = serve()
            first = present_from(node, pull)
            must(pull, "pull")
            end = time.monotonic()
            must(s, "serve", 30)
            report = json.loads((LOGS / f"{run.label}-pull.json").read_text())
        return {"seconds": end - t0, "mib_per_s": self.size / MIB / (end - t0),
                "stream_mib_per_s": self.size / MIB / (end - first), "report": report}

    def raw(self, netns: bool, mode: str) -> dict[str, Any]:
        """The same file as a raw TCP stream: sender start to receiver done."""
        run = Run(f"{self.count:02d}-raw-{mode}-" + ("veth" if netns else "lo"))
        self.count += 1
        host = HERE if netns else "127.0.0.1"
        try:
            recv = run.spawn("recv", py("-m", "bench.raw_stream", "recv", host, str(self.port), str(self.size)),
                             stdout=subprocess.PIPE)
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != b"listening":
                raise RuntimeError(f"the raw receiver did not start: see {LOGS}")
            t0 = time.monotonic()
            send = run.spawn("send", py("-m", "bench.raw_stream", "send", host, str(self.port), str(self.source),
                                        mode, netns=netns))
            first = float(recv.stdout.readline())  # when the first bytes arrived
            must(recv, "raw receiver")
            end = time.monotonic()
            must(send, "raw sender")
        finally:
            run.close()
        return {"seconds": end - t0, "mib_per_s": self.size / MIB / (end - t0),
                "stream_mib_per_s": self.size / MIB / (end - first)}

    def guest_run(self, label: str, serve_args: list[str], pattern: str, threads: int, touches: int,
                  seed: int, *, complete: bool) -> dict[str, Any]:
        """A guest touching pages while serve runs with ``serve_args``.

        ``complete``: wait for the pull to finish (its report is kept);
        otherwise stop both daemons once the guest is done.
        """
        with self.migration(label, serve_args) as (run, node, pull, serve):
            guest = run.spawn("guest", py("-m", "bench.daemon_bench", "guest", node, str(self.size), pattern,
                                          str(threads), str(touches), str(seed)), stdout=subprocess.PIPE)
            s = serve()
            out, _ = guest.communicate(timeout=900)
            if guest.returncode != 0:
                raise RuntimeError(f"guest exited {guest.returncode}: see {LOGS}")
            result: dict[str, Any] = json.loads(out)
            if complete:
                must(pull, "pull")
                result["pull_exit"] = time.monotonic()
                must(s, "serve", 30)
            else:  # SIGINT: the pull writes its report and exits 1, leaving the instance
                pull.send_signal(signal.SIGINT)
                pull.wait(60)
            result["report"] = json.loads((LOGS / f"{run.label}-pull.json").read_text())
        return result


# ---- statistics and tables ---------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


def fault_latencies(result: dict[str, Any]) -> list[float]:
    """The guest's timed accesses of pages that were missing, after its first."""
    return [us for _, us, missing in result["touches"] if missing]


def fault_percentiles(results: list[dict[str, Any]], q: float) -> list[float]:
    """Each run's q-th fault-latency percentile, for the runs whose guest timed a fault (under
    load the push can deliver every page first: such a run has no latency to count)."""
    return [percentile(latencies, q) for r in results if (latencies := fault_latencies(r))]


def make_source(path: Path, size: int) -> None:
    """Every page distinct and non-zero (its number, then random bytes): no
    hole and no zero page, so no ZERO hint flatters the push."""
    rng = random.Random(1)
    with open(path, "wb") as f:
        for start in range(0, size, MIB):
            chunk = bytearray(rng.randbytes(MIB))
            for page in range(MIB // PAGE_SIZE):
                chunk[page * PAGE_SIZE:page * PAGE_SIZE + 8] = (start // PAGE_SIZE + page + 1).to_bytes(8, "big")
            f.write(chunk)


def spread(values: list[float], fmt: str = ".0f", unit: str = "") -> str:
    """'median (min-max)' of the runs."""
    if not values:
        return "n/a"
    return f"{med(values):{fmt}}{unit} ({min(values):{fmt}}-{max(values):{fmt}})"


def tables(data: dict[str, Any], runs: int) -> str:
    """The Markdown tables: medians over runs, with (min-max); every ratio is
    taken within a run (side by side), then its median."""
    links = [link for link in ("lo", "veth") if f"push-{link}" in data["throughput"]]
    names = {"lo": "loopback", "veth": "veth"}
    tp = data["throughput"]
    lines = [f"| push vs raw TCP, {data['size_mib']} MiB, MiB/s | " + " | ".join(names[lk] for lk in links) + " |",
             "| --- |" + " ---: |" * len(links)]
    kinds = (("push", "umemd push"), ("sendfile", "raw TCP, `socket.sendfile`"),
             ("sendall", "raw TCP, `sendall` of 1 MiB slices"))
    for key, heading in (("mib_per_s", "process start → done"), ("stream_mib_per_s", "first page or byte → done")):
        lines.append(f"| *{heading}:* |" + " |" * len(links))
        for kind, label in kinds:
            lines.append(f"| {label} | " + " | ".join(spread([r[key] for r in tp[f"{kind}-{lk}"]]) for lk in links)
                         + " |")
        for kind, label in kinds[1:]:
            ratios = [spread([p[key] / r[key] for p, r in zip(tp[f"push-{lk}"], tp[f"{kind}-{lk}"], strict=True)],
                             ".2f", X) for lk in links]
            lines.append(f"| push / {label.removeprefix('raw TCP, ')} | " + " | ".join(ratios) + " |")

    lat = data["latency"]
    lines += ["", "| demand faults, guest-timed (random missing pages) | faults timed | p50 µs | p90 µs | p99 µs |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for mode, label in (("demand-only", f"push capped at {NO_PUSH_RATE} MiB/s (demand only)"),
                        ("with-push", "push at full speed")):
        cells = [spread([float(len(fault_latencies(r))) for r in lat[mode]])]
        cells += [spread(fault_percentiles(lat[mode], q)) for q in (50, 90, 99)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    timed = [(w, d) for w, d in zip(lat["with-push"], lat["demand-only"], strict=True)
             if fault_latencies(w) and fault_latencies(d)]
    ratios = [spread([percentile(fault_latencies(w), q) / percentile(fault_latencies(d), q) for w, d in timed],
                     ".2f", X) for q in (50, 90, 99)]
    lines.append("| with push / demand only | | " + " | ".join(ratios) + " |")
    lines += ["", "| the same faults, pull's report (power-of-two buckets) | p50 µs ≤ | p99 µs ≤ |",
              "| --- | ---: | ---: |"]
    for mode in ("demand-only", "with-push"):
        reps = [r["report"]["fault_latency_us"] for r in lat[mode] if "report" in r]
        lines.append(f"| {mode} | {spread([x['p50'] for x in reps])} | {spread([x['p99'] for x in reps])} |")

    lines += ["", "| pages by faults vs pushed | guest touches | faults | demand pages | pushed pages "
              "| sent twice | by faults | guest-timed faults | their p50 µs |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, results in data["prepage"].items():
        reports = [r["report"] for r in results]
        share = [100 * x["demand_pages"] / (x["demand_pages"] + x["pushed_pages"]) for x in reports]
        lines.append(
            f"| {key} | {med([len(r['touches']) for r in results]):.0f} "
            f"| {spread([x['faults'] for x in reports])} | {spread([x['demand_pages'] for x in reports])} "
            f"| {spread([x['pushed_pages'] for x in reports])} | {spread([x['skipped_pages'] for x in reports])} "
            f"| {spread(share, '.1f', ' %')} | {spread([float(len(fault_latencies(r))) for r in results])} "
            f"| {spread(fault_percentiles(results, 50))} |")
    lines += ["", f"Median (min-max) of {runs} runs; each ratio is taken within one run, then its median."]
    return "\n".join(lines)


def report_main(args: argparse.Namespace) -> int:
    saved = json.loads(args.json.read_text())
    text = render(saved["context"], saved["data"])
    print(text)
    if args.doc:
        update_doc(args.doc, DOC.wrap(text), DOC)
    return 0


def render(context: str, data: dict[str, Any]) -> str:
    runs = len(data["latency"]["with-push"])
    return ("    make bench-daemon\n\n" + textwrap.fill(context, 100, break_on_hyphens=False, break_long_words=False)
            + "\n\n" + tables(data, runs))


def workspace(work: Path) -> tuple[Path, Path]:
    """The paths of the source file and a new key in ``work`` (the key written)."""
    work.mkdir(parents=True, exist_ok=True)
    key = work / "key"
    key.write_text(os.urandom(32).hex() + "\n")
    key.chmod(0o600)  # umemd refuses a key others can read
    return work / "guest-ram", key


def bench_main(args: argparse.Namespace) -> int:
    from umemd import node_path  # noqa: F401 (fail early if the package is missing)

    source, key = workspace(Path(args.workdir))
    began = time.time()
    t0 = time.monotonic()
    make_source(source, args.size_mib * MIB)
    print(f"source: {args.size_mib} MiB of distinct pages in {time.monotonic() - t0:.1f} s", flush=True)
    bench = Bench(source, key)
    data: dict[str, Any] = {"size_mib": args.size_mib, "throughput": {},
                            "latency": {"demand-only": [], "with-push": []}, "prepage": {}}
    links = [False, True] if args.veth else [False]
    loadavg = [os.getloadavg()[0]]
    with veth_namespace(NETNS, "umb0", "umb1", HERE, THERE) if args.veth else nullcontext():
        for i in range(args.runs):
            for netns in links:
                link = "veth" if netns else "lo"
                data["throughput"].setdefault(f"push-{link}", []).append(bench.push(netns))
                for mode in ("sendfile", "sendall"):
                    data["throughput"].setdefault(f"{mode}-{link}", []).append(bench.raw(netns, mode))
            for mode, serve_args in (("demand-only", ["--max-push-rate", NO_PUSH_RATE]), ("with-push", [])):
                data["latency"][mode].append(bench.guest_run(f"lat-{mode}", serve_args, "random", args.threads,
                                                             args.touches, seed=100 + i, complete=mode == "with-push"))
            for pattern in ("sequential", "random"):
                for prepage in (8, 1):
                    result = bench.guest_run(f"prepage{prepage}-{pattern}", ["--prepage", str(prepage)], pattern,
                                             args.threads, args.prepage_touches, seed=200 + i, complete=True)
                    data["prepage"].setdefault(f"{pattern}, --prepage {prepage}", []).append(result)
            print(f"run {i + 1}/{args.runs} done, {time.monotonic() - t0:.0f} s", flush=True)
            loadavg.append(os.getloadavg()[0])
    uname = platform.uname()
    context = (f"Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(began))} "
               f"({(time.monotonic() - t0) / 60:.0f} min) inside the test VM: kernel {uname.release}, "
               f"{os.cpu_count()} vCPUs, TCG; {args.size_mib} MiB source file of distinct non-zero pages "
               f"(no hole, no zero page); guests of {args.threads} threads; load average in the VM "
               f"{' → '.join(f'{x:.2f}' for x in loadavg)}. Raw results: `build/bench-daemon.json`, "
               f"logs in `build/bench-daemon-logs/`.")
    text = render(context, data)
    print(text)
    if args.out:
        args.out.write_text(json.dumps({"context": context, "data": data}, indent=1))
    if args.doc:
        update_doc(args.doc, DOC.wrap(text), DOC)
    return 0


def profile_main(args: argparse.Namespace) -> int:
    """py-spy profiles of both daemons: a loopback push, and faults with the push running."""
    source, key = workspace(Path(args.workdir))
    make_source(source, args.size_mib * MIB)
    push = Bench(source, key, profile="push").push(netns=False)
    print(f"push under py-spy: {push['mib_per_s']:.0f} MiB/s", flush=True)
    Bench(source, key, profile="faults").guest_run("profile-faults", [], "random", args.threads, args.touches, seed=7,
                                                   complete=True)
    for raw in sorted((CHECKOUT / "build").glob("profile-daemon-*.raw")):
        text = summarize_profile(raw)
        raw.with_suffix(".txt").write_text(text)
        print(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    parser.add_argument("--runs", type=int, default=3, help="runs of each configuration (default 3)")
    parser.add_argument("--size-mib", type=int, default=256, help="source file size (default 256)")
    parser.add_argument("--threads", type=int, default=2, help="guest threads (default 2)")
    parser.add_argument("--touches", type=int, default=400,
                        help="random pages each guest thread touches in the latency test (default 400)")
    parser.add_argument("--prepage-touches", type=int, default=1500,
                        help="pages each guest thread touches in the pre-paging test (default 1500)")
    parser.add_argument("--no-veth", dest="veth", action="store_false", help="loopback only")
    parser.add_argument("--workdir", default="/tmp/umem-bench", help="source file and key (default %(default)s)")
    parser.add_argument("--out", type=Path, help="write every run here as JSON")
    parser.add_argument("--doc", type=Path, help="replace the generated block of the Daemon section in this file")
    rep = sub.add_parser("report", help="print (and with --doc, write) the tables of an --out file again")
    rep.add_argument("json", type=Path)
    sub.add_parser("profile", help="py-spy both daemons in one push and one fault run (build/profile-daemon-*)")
    g = sub.add_parser("guest")
    for name in ("node", "size", "pattern", "threads", "touches", "seed"):
        g.add_argument(name, type=str if name in ("node", "pattern") else int)
    args = parser.parse_args()
    handlers = {"report": report_main, "profile": profile_main, "guest": guest_main}
    return handlers.get(args.command, bench_main)(args)


if __name__ == "__main__":
    sys.exit(main())
