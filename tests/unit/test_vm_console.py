"""Host-side tests of the console scanner and the initramfs writer (no VM)."""

from __future__ import annotations

import gzip

from tests.harness.vm import console, initramfs
from tests.harness.vm.__main__ import died_before_init
from tests.harness.vm.qemu import RunResult

CLEAN_BOOT = """\
[    1.274533] mtrr: your CPUs had inconsistent fixed MTRR settings
[    2.303971] Unstable clock detected, switching default tracing clock to "global"
umem-vm: init started
umem-vm: running command
[    3.912866] reboot: Restarting system
"""

WARN_SPLAT = """\
[   12.000001] ------------[ cut here ]------------
[   12.000002] WARNING: CPU: 1 PID: 312 at kernel/umem/umem.c:120 umem_fault+0x4a/0x90 [umem]
[   12.000003] Modules linked in: umem(OE) 9p 9pnet_virtio
[   12.000004] Call Trace:
[   12.000005]  <TASK>
[   12.000006] Kernel panic - not syncing: kernel: panic_on_warn set ...
"""


def test_clean_boot_has_no_problems() -> None:
    assert console.scan(CLEAN_BOOT.splitlines()) == []


def test_warn_splat_is_reported_with_line_numbers() -> None:
    problems = console.scan(WARN_SPLAT.splitlines())
    assert [(p.lineno, p.pattern) for p in problems] == [
        (2, "WARNING:"), (4, "Call Trace"), (6, "Kernel panic")]
    assert "umem_fault" in str(problems[0])


def test_every_pattern_is_detected() -> None:
    samples = {
        "WARNING:": "[ 1.0] WARNING: CPU: 0 PID: 1 at mm/slub.c:1 x",
        "BUG:": "[ 1.0] BUG: kernel NULL pointer dereference, address: 0000000000000008",
        "Oops": "[ 1.0] Oops: 0002 [#1] PREEMPT SMP NOPTI",
        "Call Trace": "[ 1.0] Call Trace:",
        "Kernel panic": "[ 1.0] Kernel panic - not syncing: Attempted to kill init!",
        "general protection fault": "[ 1.0] general protection fault, probably for "
                                    "non-canonical address 0xdead000000000100",
        "UBSAN": "[ 1.0] UBSAN: shift-out-of-bounds in kernel/umem/umem.c:77:3",
        "KASAN": "[ 1.0] ==================================================================\r"
                 "\n[ 1.0] KASAN: use-after-free in umem_release",
    }
    for pattern, text in samples.items():
        found = {p.pattern for p in console.scan(text.splitlines())}
        assert pattern in found, (pattern, text)


def test_scanner_joins_lines_split_across_reads_and_strips_cr() -> None:
    scanner = console.ConsoleScanner()
    assert scanner.feed(b"[ 1.0] WAR") == []
    assert scanner.feed(b"NING: CPU: 0\r\n[ 2.0] ok\r\npartial BUG:") == [
        "[ 1.0] WARNING: CPU: 0", "[ 2.0] ok"]
    assert scanner.finish() == ["partial BUG:"]
    assert [(p.lineno, p.pattern) for p in scanner.problems] == [(1, "WARNING:"), (3, "BUG:")]
    assert scanner.count == 3


def test_excerpt_starts_before_the_first_problem() -> None:
    lines = [f"line {i}" for i in range(200)]
    lines[100] = "[ 9.0] WARNING: CPU: 1 PID: 2 at x"
    problems = console.scan(lines)
    shown = console.excerpt(lines, problems, before=5, limit=10)
    assert shown[0] == "line 95" and shown[5] == lines[100] and len(shown) == 10
    assert console.excerpt(lines, [], limit=3) == ["line 197", "line 198", "line 199"]


def test_lowercase_and_benign_words_do_not_match() -> None:
    benign = [
        "[ 1.0] warning: this is not the kernel's format",
        "[ 1.0] debug: nothing",
        "[ 1.0] ACPI: PM-Timer IO Port: 0x608",
    ]
    assert console.scan(benign) == []


def test_load_order_puts_dependencies_first() -> None:
    deps = initramfs.parse_modules_dep(
        "kernel/fs/netfs/netfs.ko:\n"
        "kernel/fs/fscache/fscache.ko: kernel/fs/netfs/netfs.ko\n"
        "kernel/net/9p/9pnet.ko:\n"
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko kernel/fs/fscache/fscache.ko"
        " kernel/fs/netfs/netfs.ko\n"
        "kernel/arch/x86/kvm/kvm-amd.ko: kernel/arch/x86/kvm/kvm.ko\n"
        "kernel/arch/x86/kvm/kvm.ko:\n")
    assert initramfs.load_order(["9p", "kvm-amd"], deps) == [
        "kernel/net/9p/9pnet.ko", "kernel/fs/netfs/netfs.ko", "kernel/fs/fscache/fscache.ko",
        "kernel/fs/9p/9p.ko.xz", "kernel/arch/x86/kvm/kvm.ko", "kernel/arch/x86/kvm/kvm-amd.ko"]
    assert initramfs.load_order(["virtio"], deps, builtin={"virtio"}) == []


def test_cpio_is_newc_with_aligned_entries() -> None:
    cpio = initramfs.CpioWriter()
    cpio.file("etc/umem-vm/run.conf", b"X=1\n")
    cpio.symlink("bin/sh", "busybox")
    data = cpio.finish()
    names = []
    pos = 0
    while True:
        assert data[pos:pos + 6] == b"070701" and pos % 4 == 0
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        size, namesize = fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        names.append(name)
        pos += 110 + namesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            break
        pos += size + (-size % 4)
    assert names == ["etc", "etc/umem-vm", "etc/umem-vm/run.conf", "bin", "bin/sh", "TRAILER!!!"]
    assert pos == len(data)
    assert gzip.decompress(initramfs.run_archive({"a": b"b"})).startswith(b"070701")


def test_only_a_boot_that_died_before_its_init_started_is_booted_again() -> None:
    assert died_before_init(RunResult(status=None, elapsed=4.8, problems=[], marker_seen=False))
    # the init ran: whatever failed may be the checkout's
    assert not died_before_init(RunResult(status=None, elapsed=60, problems=[], marker_seen=True))
    assert not died_before_init(RunResult(status=1, elapsed=60, problems=[], marker_seen=True))
    # a timeout may be the command's, even if the marker was lost
    assert not died_before_init(RunResult(status=None, elapsed=900, problems=[], timed_out=True))
