"""The migration benchmark's harness (bench/): its parsers, its doc section, and one
short run in the host topology, so that ``make bench-baseline`` (never part of
``make test``) and the end-to-end issue's umem mode keep a working base."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness.machine import GuestImage, Settings, WorkloadLog, complete_lines
from tests.harness.topology import ClockSample, HostTopology
from umemd.protocol import PAGE_SIZE

from . import link, report
from .daemon_bench import tables
from .docblock import update_doc
from .metrics import event_interval, heartbeat_gaps, page_requests, percentile, qemu_latency, summary
from .modes import MODES, Precopy
from .race import stream_bytes
from .run import run_once

BLOCK = report.BLOCKS["baseline"]

TRACE = """\
161@1795644209.425413:postcopy_ram_fault_thread_request Request for HVA=0x7f941e4d8000 rb=pc.ram offset=0x0 pid=160
161@1795644209.438724:postcopy_page_req_add new page req 0x7f941e4d8000 total 1
161@1795644209.440000:postcopy_ram_fault_thread_request Request for HVA=0x7f941e4d8000 rb=pc.ram offset=0x0 pid=160
162@1795644209.449982:postcopy_page_req_del resolved page req 0x7f941e4d8000 total 0
161@1795644209.452152:postcopy_ram_fault_thread_request Request for HVA=0x7f94381f3000 rb=pc.ram offset=0x1 pid=160
161@1795644209.500000:postcopy_ram_fault_thread_request Request for HVA=0x7f9400000000 rb=pc.ram offset=0x2 pid=160
161@1795644209.552231:postcopy_page_req_add new page req 0x7f94381f3000 total 1
162@1795644209.652152:postcopy_page_req_del resolved page req 0x7f94381f3000 total 0
162@1795644209.700000:postcopy_page_req_del resolved page req 0x7f9400001000 total 0
qemu-system-x86_64: some unrelated message
"""


def test_page_requests_pairs_fault_request_and_placement() -> None:
    pr = page_requests(TRACE)
    assert (pr.faults, pr.requests) == (4, 2)
    # first page: fault read at .425413, placed at .449982
    assert pr.latencies_ms == pytest.approx([24.569, 200.0])
    assert pr.request_ms == pytest.approx([11.258, 99.921])
    d = pr.to_dict()
    assert d["resolved"] == 2 and d["p50_ms"] == pytest.approx(24.569) and d["p99_ms"] == pytest.approx(200.0)
    assert page_requests("").to_dict()["p50_ms"] is None
    # RESUME at .400000: only the first page's fault is within 50 ms of it.
    early = page_requests(TRACE, resume_ns=1795644209_400000_000, early_s=0.05).to_dict()["early"]
    assert early["requests"] == 1 and early["p50_ms"] == pytest.approx(24.569)


# The same trace as QEMU 10.1 and later write it: the log backend leaves the
# timestamp to -msg timestamp=on (ISO 8601 in UTC, microseconds).
TRACE_ISO = """
2026-11-25T22:03:29.425413Z postcopy_ram_fault_thread_request Request for HVA=0x7f941e4d8000
2026-11-25T22:03:29.438724Z postcopy_page_req_add new page req 0x7f941e4d8000 total 1
2026-11-25T22:03:29.440000Z postcopy_ram_fault_thread_request Request for HVA=0x7f941e4d8000
2026-11-25T22:03:29.449982Z postcopy_page_req_del resolved page req 0x7f941e4d8000 total 0
2026-11-25T22:03:29.452152Z postcopy_ram_fault_thread_request Request for HVA=0x7f94381f3000
2026-11-25T22:03:29.500000Z postcopy_ram_fault_thread_request Request for HVA=0x7f9400000000
2026-11-25T22:03:29.552231Z postcopy_page_req_add new page req 0x7f94381f3000 total 1
2026-11-25T22:03:29.652152Z postcopy_page_req_del resolved page req 0x7f94381f3000 total 0
2026-11-25T22:03:29.700000Z postcopy_page_req_del resolved page req 0x7f9400001000 total 0
"""


def test_page_requests_read_the_iso_prefix_of_qemu_10_1() -> None:
    assert page_requests(TRACE_ISO).to_dict() == page_requests(TRACE).to_dict()
    # glib leaves the fraction out when it is zero
    whole = ("2026-12-01T14:34:56Z postcopy_ram_fault_thread_request Request for HVA=0x1000 rb=pc.ram\n"
             "2026-12-01T14:34:56.000100Z postcopy_page_req_add new page req 0x1000 total 1\n"
             "2026-12-01T14:34:57Z postcopy_page_req_del resolved page req 0x1000 total 0\n")
    assert page_requests(whole).latencies_ms == pytest.approx([1000.0])


def test_percentile_and_summary() -> None:
    assert percentile([5, 1, 3, 2, 4], 50) == 3
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([7], 99) == 7
    assert summary([3, None, 1, 2]) == {"median": 2, "min": 1, "max": 3, "n": 3}
    assert summary([None])["median"] is None


def test_heartbeat_gaps_span_the_switch_over() -> None:
    src = WorkloadLog.parse("UMEMWL HB seq=1 t=1000000000 pass=1 rewrites=1\n"
                            "UMEMWL HB seq=2 t=1200000000 pass=1 rewrites=1\n")
    dst = WorkloadLog.parse("UMEMWL HB seq=3 t=4200000000 pass=1 rewrites=1\n"
                            "UMEMWL HB seq=4 t=4400000000 pass=1 rewrites=1\n"
                            "UMEMWL HB seq=5 t=5400000000 pass=1 rewrites=1\n")
    hb = heartbeat_gaps(src, dst)
    assert hb.switch_gap_ms == pytest.approx(3000)
    assert hb.max_gap_ms == pytest.approx(3000)
    assert hb.dst_max_gap_ms == pytest.approx(1000)
    assert hb.seq_continuous and hb.dst_count == 3


def test_complete_lines_drops_a_line_being_written() -> None:
    assert complete_lines("UMEMWL HB seq=1 t=5\nUMEMWL HB seq=2 t=9") == "UMEMWL HB seq=1 t=5\n"
    assert complete_lines("no newline") == ""


def test_event_interval_corrects_offset_and_drift() -> None:
    # The remote clock is 600 ms behind and loses 1 ms per second.
    before = ClockSample(offset_ns=-600_000_000, rtt_ns=1_000_000, host_ns=10**18)
    after = ClockSample(offset_ns=-610_000_000, rtt_ns=2_000_000, host_ns=10**18 + 10 * 10**9)
    stop = 10**18 + 5 * 10**9                          # host clock
    resume_host = stop + 100_000_000                   # 100 ms later
    resume_remote = resume_host - 605_100_000          # offset at t+5.1 s: -605.1 ms
    iv = event_interval(stop, resume_remote, before, after)
    assert iv["ms"] == pytest.approx(100, abs=0.01)
    assert iv["uncertainty_ms"] == 1 and iv["drift_ms"] == -10


def test_update_doc_replaces_only_the_generated_block(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n## Kernel\n\nkernel text\n")
    update_doc(doc, f"{BLOCK.begin}\nfirst\n{BLOCK.end}", BLOCK)
    text = doc.read_text()
    assert text.startswith("# Performance\n\n## Kernel\n\nkernel text\n\n" + BLOCK.section)
    # Prose around the block and the sections after it stay.
    doc.write_text(text.replace(BLOCK.begin, "hand-written prose\n\n" + BLOCK.begin)
                   + "\nafter the block\n\n## Another section\n\nother\n")
    update_doc(doc, f"{BLOCK.begin}\nsecond\n{BLOCK.end}", BLOCK)
    text = doc.read_text()
    assert "first" not in text and "second" in text
    assert "hand-written prose" in text and "after the block" in text and text.endswith("## Another section\n\nother\n")
    assert text.count(BLOCK.section) == 1


def test_table_marks_postcopy_only_rows() -> None:
    records = [{"mode": "precopy", "ok": True, "total_ms": 1500, "bytes": 3e8, "verify_failures": 0},
               {"mode": "postcopy", "ok": True, "total_ms": 1000, "bytes": 2e8, "verify_failures": 0,
                "page_requests": {"requests": 10, "p50_ms": 2.0, "p99_ms": 9.0}},
               {"mode": "postcopy", "ok": True, "total_ms": 3000, "bytes": 2e8, "verify_failures": 0,
                "page_requests": {"requests": 30, "p50_ms": 4.0, "p99_ms": 11.0}}]
    text = report.table(records, [("precopy", "pre-copy", False), ("postcopy", "postcopy-ram", True)])
    assert "the pull's last fill) | 1.5 | 2.0 (1.0-3.0) |" in text
    assert "| page-request latency p50, ms | n/a | 3.0 (2.0-4.0) |" in text
    assert "| verify failures (BAD pages, all passes, both sides) | 0 in 1 runs | 0 in 2 runs |" in text


def test_postcopy_preempt_run_in_the_host_topology(tmp_path: Path, guest: GuestImage) -> None:
    """One migration through the benchmark's own path: agent, QMP and serial over
    TCP, capabilities before migrate-incoming, trace-based request latency."""
    mode = MODES["postcopy-preempt"]()
    settings = Settings(passes_after=1, boot_timeout=120, migrate_timeout=120, verify_timeout=120)

    async def go() -> dict[str, object]:
        async with HostTopology(tmp_path / "bench") as topo:
            return await run_once(topo, mode, guest, settings, 1, tmp_path / "run")

    rec = asyncio.run(go())
    assert rec["ok"], rec.get("error") or rec.get("problems")
    assert rec["verify_failures"] == 0
    assert isinstance(rec["stop_resume_ms"], float) and 0 < rec["stop_resume_ms"] < 5000
    requests = rec["page_requests"]
    assert isinstance(requests, dict) and requests["requests"] > 0 and requests["p50_ms"] is not None
    assert rec["blocktime_ms"] is not None
    # QEMU 10.1+ times the same requests itself (issue 13 item 2)
    assert isinstance(rec["qemu_latency"], dict) and rec["qemu_latency"]["requests"] > 0
    assert rec["qemu_latency"]["p50_ms"] > 0


def test_a_destination_under_another_accelerator_than_asked_is_refused(tmp_path: Path) -> None:
    """Every destination says which accelerator it runs: a KVM destination that silently fell
    back to TCG would make the race measure TCG in TCG again."""
    async def go() -> None:
        async with HostTopology(tmp_path / "bench") as topo:
            dst = topo.destination("dst-accel", ["-m", "64M", "-incoming", "defer"], tmp_path)
            topo.dst_accel = "kvm"  # asked for after the command line was made: this QEMU runs TCG
            with pytest.raises(RuntimeError, match="runs under tcg, not kvm as asked"):
                async with dst:
                    pass
            assert await dst.exit_status() is not None, "the refused destination QEMU still runs"

    asyncio.run(go())


class _CappedPrecopy(Precopy):
    """Pre-copy at 1 MiB/s: it cannot converge within a second, whatever the machine's speed."""

    def source_parameters(self, settings: Settings) -> dict[str, object]:
        return {**super().source_parameters(settings), "max-bandwidth": 1 << 20}


def test_precopy_past_its_cap_is_cancelled_and_reported_not_converged(tmp_path: Path, guest: GuestImage) -> None:
    settings = Settings(precopy_cap_s=1.0, boot_timeout=120)

    async def go() -> dict[str, object]:
        async with HostTopology(tmp_path / "bench") as topo:
            return await run_once(topo, _CappedPrecopy(), guest, settings, 1, tmp_path / "run")

    rec = asyncio.run(go())
    assert rec["ok"], rec.get("error") or rec.get("problems")
    assert rec["converged"] is False and rec["precopy_cap_s"] == 1.0
    assert rec["verify_failures"] == 0 and isinstance(rec["bytes"], int) and rec["bytes"] > 0
    assert "total_ms" not in rec


def test_link_probe_streams_every_byte_and_times_round_trips(tmp_path: Path) -> None:
    """The link-limit probe through a real forward (the host topology's agent runs the receiving ends)."""
    path = link.stream_file(tmp_path / "link", (3 << 20) + 5)
    assert b"\0" not in path.read_bytes()

    async def go() -> dict[str, object]:
        async with HostTopology(tmp_path / "bench") as topo:
            return await link.probe(topo, path)

    result = asyncio.run(go())
    stream, rtt = result["stream"], result["round_trip"]
    assert isinstance(stream, dict) and stream["bytes"] == (3 << 20) + 5 and stream["seconds"] > 0
    assert isinstance(rtt, dict) and rtt["rounds"] == link.ROUNDS and 0 < rtt["p50_ms"] <= rtt["p99_ms"]


def test_daemon_tables_leave_out_a_run_whose_guest_timed_no_fault() -> None:
    """Under load the push can deliver every page before the guest touches it: that run has no
    fault latency, and must not turn a median or a ratio into nan."""
    def run(latencies: list[float]) -> dict[str, object]:
        touches = [(0, 3.0, False)] + [(i + 1, us, True) for i, us in enumerate(latencies)]
        report = {"faults": len(latencies), "demand_pages": len(latencies), "pushed_pages": 100,
                  "skipped_pages": 0, "fault_latency_us": {"p50": 64, "p99": 128}}
        return {"touches": touches, "report": report}

    runs = [run([900.0, 1000.0]), run([]), run([800.0])]
    data = {"size_mib": 1, "throughput": {}, "prepage": {"sequential, --prepage 8": runs},
            "latency": {"demand-only": runs[::-1], "with-push": runs}}
    text = tables(data, 3)
    assert "nan" not in text, text


def test_qemu_latency_reads_the_mean_and_the_log2_buckets() -> None:
    # bucket N holds [2^N, 2^(N+1)) µs: 3 requests in [4, 8), 1 in [1024, 2048)
    info = {"postcopy-latency": 2_500_000, "postcopy-latency-dist": [0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 1]}
    assert qemu_latency(info) == {"requests": 4, "mean_ms": 2.5, "p50_ms": 0.008, "p99_ms": 2.048}
    assert qemu_latency({"postcopy-blocktime": 5}) is None


def _rec(mode: str, index: int, total_ms: float | None, p50: float | None = None, **extra: object) -> dict[str, object]:
    r: dict[str, object] = {"mode": mode, "index": index, "ok": True, "bytes": 2e8, "verify_failures": 0, **extra}
    if total_ms is not None:
        r["total_ms"] = total_ms
    if p50 is not None:
        r["page_requests"] = {"requests": 10, "p50_ms": p50, "p99_ms": 3 * p50}
    return r


def _link(index: int, seconds: float, p50: float, ram: str = "512M") -> dict[str, object]:
    return {"guest_ram": ram, "index": index, "ok": True, "bytes_of": "postcopy's non-zero pages",
            "stream": {"bytes": 1e8, "seconds": seconds, "mb_per_s": 1e2 / seconds},
            "round_trip": {"rounds": 2000, "p50_ms": p50, "p99_ms": 2 * p50}}


MODES_2 = [("precopy", "pre-copy", False), ("postcopy", "postcopy-ram", True)]


def test_table_sets_each_run_beside_the_link_probe_of_its_own_round() -> None:
    records = [_rec("postcopy", 1, 4000, p50=2.0), _rec("postcopy", 2, 9000, p50=8.0),
               _rec("precopy", 1, 6000), _rec("precopy", 2, 6000)]
    # round 2 was slower on the link too: per-round ratios, not ratios of medians
    links = [_link(1, 2.0, 1.0), _link(2, 4.5, 4.0)]
    text = report.table(records, MODES_2, links)
    assert "| pre-copy | postcopy-ram | link limit (raw TCP) |" in text
    assert "the pull's last fill) | 6.0 | 6.5 (4.0-9.0) | 3.2 (2.0-4.5) |" in text
    assert "| page-request latency p50, ms | n/a | 5.0 (2.0-8.0) | 2.5 (1.0-4.0) |" in text
    assert "| total time ÷ the raw stream's time, same round | 2.17 (1.33-3.00) | 2.00 | n/a |" in text
    assert "| page-request latency p50 ÷ the raw round trip's p50, same round | n/a | 2.0 |" in text
    assert "| runs completed / run | 2 / 2 | 2 / 2 | 2 / 2 |" in text


def test_table_counts_a_precopy_cancelled_at_its_cap_but_times_only_the_converged() -> None:
    records = [_rec("precopy", 1, 6000), _rec("precopy", 2, None, converged=False, precopy_cap_s=300.0)]
    text = report.table(records, MODES_2[:1])
    assert "the pull's last fill) | 6.0 |" in text
    assert "| runs completed / run | 2 / 2 (1 not converged in 300 s) |" in text
    assert "| verify failures (BAD pages, all passes, both sides) | 0 in 2 runs |" in text


def test_growth_table_compares_each_mode_with_itself_at_the_smallest_size() -> None:
    sizes = [{"ram": "512M", "mib": 192}, {"ram": "2G", "mib": 768}]
    records = [{**_rec("postcopy", 1, 5000, p50=2.0), "guest_ram": "512M"},
               {**_rec("postcopy", 1, 20000, p50=2.0), "guest_ram": "2G"},
               {**_rec("precopy", 1, 8000), "guest_ram": "512M"},
               {**_rec("precopy", 1, None, converged=False, precopy_cap_s=300.0), "guest_ram": "2G"}]
    result = {"sizes": sizes, "records": records, "links": [_link(1, 2.5, 1.0), _link(1, 10.0, 1.0, "2G")],
              "modes": [{"name": n, "title": t, "postcopy": pc} for n, t, pc in MODES_2]}
    text = report.growth_table(result)
    assert "| 2G | postcopy-ram | 20.0 | — | — | 2.0 | 6 | 200 | 2.00 | 4.00 |" in text
    assert "| 512M | pre-copy | 8.0 | — | — | n/a | n/a | 200 | 3.20 | 1.00 |" in text
    assert "| 2G | pre-copy | not converged |" in text
    assert "| 2G | link limit (raw TCP) | 10.0 | n/a | n/a | 1.0 | 2 | 100 | 1.00 | |" in text


def test_the_raw_stream_carries_as_many_bytes_as_postcopy_sent_non_zero_pages() -> None:
    s = Settings(ram="1G", mib=384)
    records = [{"mode": "postcopy", "guest_ram": "512M", "index": 1, "ram": {"normal": 10}},
               {"mode": "postcopy", "guest_ram": "1G", "index": 2, "ram": {"normal": 99}},
               {"mode": "postcopy", "guest_ram": "1G", "index": 1, "ram": {"normal": 70000}}]
    assert stream_bytes(records, s, 1) == (70000 * PAGE_SIZE, "postcopy's non-zero pages")
    assert stream_bytes(records[:2], s, 1) == (384 << 20, "the workload's size")
