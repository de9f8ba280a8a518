"""Run the patched QEMU on the host: find the build, start guests, parse their output.

- :func:`qemu_binary` / :func:`qemu_datadir`: the build of ``make qemu``
  (``qemu-patches/build.sh``), overridable with ``UMEM_QEMU``.
- :func:`guest_image`: the test guest of ``tests/qemu/guest/build.sh``.
- :class:`Vm`: one QEMU process with a QMP socket (``qemu.qmp``) and its serial
  console in a file; an async context manager.
- :class:`WorkloadLog`: the guest workload's ``UMEMWL`` lines (heartbeats,
  verification passes, bad pages), see ``tests/qemu/guest/workload.c``.
- :func:`run_qemu`: a short synchronous run, for command-line error checks.

Every guest on the host runs under TCG: this host's KVM boots no standard guest (BRIEF §5).
A destination under KVM (inside the test VM, nested) takes :func:`migration_guest_args` on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient

from tests.harness import CHECKOUT

CACHE = Path(os.environ.get("UMEM_CACHE", "/var/cache/umem"))
ACCEL = os.environ.get("UMEM_QEMU_ACCEL", "tcg")
# A guest migrating between TCG and KVM needs a CPU model both offer, and a clock other than
# the TSC: under TCG the guest's TSC is the host's, which KVM does not carry on, and the
# migrated guest's clock stands still (docs/performance.md, "The destination under KVM").
CROSS_ACCEL_CPU = "qemu64"
CROSS_ACCEL_CMDLINE = "clocksource=hpet"


PR_SET_PDEATHSIG = 1
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child


def die_with_driver(signum: int = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` for the harness's host-side children (source QEMUs, ``umemd serve``):
    the child gets ``signum`` when the driver that started it dies, however it dies (SIGKILL, a
    CI timeout), instead of running on as an orphan: a TCG guest left behind spins a core."""
    driver = os.getpid()

    def arm() -> None:
        _PRCTL(PR_SET_PDEATHSIG, signum)
        if os.getppid() != driver:  # the driver died before the line above
            os._exit(1)
    return arm


def qemu_binary() -> Path:
    """The patched qemu-system-x86_64 (``UMEM_QEMU`` or the cache's ``current``)."""
    env = os.environ.get("UMEM_QEMU")
    return Path(env) if env else CACHE / "qemu" / "current" / "bin" / "qemu-system-x86_64"


def qemu_datadir() -> Path:
    """Firmware directory for ``-L``, beside the binary's ``bin/``."""
    return qemu_binary().resolve().parent.parent / "share" / "qemu"


def qemu_base_args(accel: str = ACCEL) -> list[str]:
    """The binary and what every guest here shares: firmware, no default devices, q35, ``accel``."""
    return [str(qemu_binary()), "-L", str(qemu_datadir()), "-nodefaults", "-display", "none",
            "-machine", "q35", "-accel", accel]


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    cmdline: str

    def args(self, kernel_args: str = "", **params: int) -> list[str]:
        """``-kernel/-initrd/-append`` with ``kernel_args`` and workload parameters
        (``mib=64`` → ``wl_mib=64``)."""
        extra = " ".join([kernel_args, *(f"wl_{k}={v}" for k, v in params.items())])
        return ["-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", f"{self.cmdline} {extra.strip()}".strip()]


@dataclass
class Settings:
    """What every run shares: the guest and the limits of one migration."""

    ram: str = "512M"           # guest RAM
    mib: int = 192              # workload size (wl_mib)
    grow_mib: int = 0           # memory the workload takes while it runs, up to the switch-over (wl_grow_mib)
    passes_after: int = 2       # destination verification passes after completion
    postcopy_after_s: float = 0.0  # pre-copy before migrate-start-postcopy
    precopy_cap_s: float = 300.0  # pre-copy that has not converged by then is cancelled: "not converged"
    boot_timeout: float = 180.0
    migrate_timeout: float = 600.0
    verify_timeout: float = 600.0


def migration_guest_args(guest: GuestImage, settings: Settings, dst_accel: str = ACCEL) -> list[str]:
    """The guest's arguments on both sides of a migration: RAM, kernel, workload, and for a
    destination under another accelerator than the source's the CPU and clock both can keep."""
    cross = dst_accel != ACCEL
    return ["-m", settings.ram, *(["-cpu", CROSS_ACCEL_CPU] if cross else []),
            *guest.args(CROSS_ACCEL_CMDLINE if cross else "", mib=settings.mib, grow_mib=settings.grow_mib)]


def guest_image() -> GuestImage:
    """Build (or reuse from the cache) the test guest and return its files."""
    out = subprocess.run(["bash", str(CHECKOUT / "tests/qemu/guest/build.sh")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
    d = Path(out)
    return GuestImage(d / "vmlinuz", d / "initrd.img", (d / "cmdline").read_text().strip())


class MigrationTimeout(AssertionError):
    """A migration still short of the awaited state at the deadline (pre-copy that does not converge)."""


@dataclass
class QemuRun:
    returncode: int
    output: str


def run_qemu(*args: str, qmp_commands: list[str] | None = None, timeout: float = 60) -> QemuRun:
    """Start QEMU with ``args`` and a QMP monitor on stdio, send ``qmp_commands``
    (then ``quit``), and return its exit code and combined output."""
    cmds = ['{"execute": "qmp_capabilities"}', *(qmp_commands or []), '{"execute": "quit"}']
    p = subprocess.run([*qemu_base_args(), *args, "-qmp", "stdio"], input="\n".join(cmds) + "\n",
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
    return QemuRun(p.returncode, p.stdout)


def complete_lines(text: str) -> str:
    """``text`` up to its last newline: a line still being written is not parsed."""
    return text[: text.rfind("\n") + 1]


_LINE = re.compile(r"UMEMWL (?P<tag>[A-Z]+)(?P<rest>.*)")
_KV = re.compile(r"(\w+)=(\S+)")


@dataclass
class WorkloadLog:
    """The workload's report, parsed from a serial console log."""

    heartbeats: list[tuple[int, int]] = field(default_factory=list)  # (seq, t_ns)
    verifies: list[dict[str, int]] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    filled: bool = False
    errors: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> WorkloadLog:
        log = cls()
        for line in text.splitlines():
            m = _LINE.search(line)
            if not m:
                continue
            tag, kv = m["tag"], dict(_KV.findall(m["rest"]))
            if tag == "HB":
                log.heartbeats.append((int(kv["seq"]), int(kv["t"])))
            elif tag == "VERIFY":
                log.verifies.append({k: int(v) for k, v in kv.items()})
            elif tag == "BAD":
                log.bad.append(line.strip())
            elif tag == "FILLED":
                log.filled = True
            elif tag == "ERROR":
                log.errors.append(line.strip())
        return log

    @property
    def total_bad(self) -> int:
        return sum(v["bad"] for v in self.verifies)

    def max_gap_ms(self, after_ns: int = 0) -> float:
        """Longest gap between consecutive heartbeats (guest monotonic time)."""
        ts = [t for _, t in self.heartbeats if t >= after_ns]
        return max((b - a for a, b in itertools.pairwise(ts)), default=0) / 1e6


class Vm:
    """One QEMU process: QMP on a Unix socket, serial console to ``<name>.serial``."""

    serial_poll = 0.2  # seconds between two looks at the serial log

    def __init__(self, workdir: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.qmp_path = workdir / f"{name}.qmp"
        self.serial_path = workdir / f"{name}.serial"
        self.stderr_path = workdir / f"{name}.stderr"
        self.args = [*qemu_base_args(), "-name", name,
                     "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                     "-serial", f"file:{self.serial_path}", *args]
        self.proc: subprocess.Popen[bytes] | None = None
        self.qmp = QMPClient(name)

    async def __aenter__(self) -> Vm:
        with self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                         preexec_fn=die_with_driver())
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: QEMU exited with {self.proc.returncode}: {self.stderr()}")
            try:
                await self.qmp.connect(str(self.qmp_path))
                return self
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.quit(5)
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait()

    async def quit(self, timeout: float) -> None:
        """``quit`` QEMU over QMP (within ``timeout`` seconds) and disconnect, whatever fails."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.execute("quit"), timeout)
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()

    async def cmd(self, command: str, **args: Any) -> Any:
        return await self.qmp.execute(command, args or None)

    def serial(self) -> str:
        """The serial log's whole lines (QEMU may be writing the last one)."""
        try:
            return complete_lines(self.serial_path.read_text(errors="replace"))
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def workload(self) -> WorkloadLog:
        return WorkloadLog.parse(self.serial())

    async def exit_status(self) -> int | None:
        """QEMU's exit status; None while it runs."""
        return None if self.proc is None else self.proc.poll()

    async def wait_serial(self, predicate: Any, timeout: float, what: str) -> WorkloadLog:
        """Poll the serial log until ``predicate(WorkloadLog)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            log = self.workload()
            if predicate(log):
                return log
            rc = await self.exit_status()
            if rc is not None:
                raise AssertionError(f"{self.name} exited ({rc}) while waiting for {what}: {self.stderr()}")
            if time.monotonic() > deadline:
                tail = "\n".join(self.serial().splitlines()[-15:])
                raise AssertionError(f"{self.name}: no {what} within {timeout} s; serial tail:\n{tail}")
            await asyncio.sleep(self.serial_poll)

    async def wait_migration(self, states: set[str], timeout: float) -> dict[str, Any]:
        """Poll query-migrate until its status is in ``states``; fail on 'failed', and with
        :class:`MigrationTimeout` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = await self.cmd("query-migrate")
            status = info.get("status", "none")
            if status in states:
                return info
            if status == "failed":
                raise AssertionError(f"{self.name}: migration failed: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise MigrationTimeout(f"{self.name}: migration still '{status}' after {timeout} s: {info}")
            await asyncio.sleep(0.1)

    async def capabilities(self) -> dict[str, bool]:
        caps = await self.cmd("query-migrate-capabilities")
        return {c["capability"]: c["state"] for c in caps}
