"""Build the QEMU command line, run the test VM and choose the accelerator.

QEMU gets three Unix-socket chardevs, all served by :func:`run_vm` from one
selector loop:

- ``console``: ttyS0, the kernel console; logged to a file and scanned,
- ``output``: ttyS1, the command's stdout and stderr; copied to our stdout,
- ``status``: virtio-serial port ``org.umem.vm.status``, a line protocol:
  the init asks for the host's time at start and reports the exit status at
  the end; we acknowledge it, and only then does the guest power off.

QEMU's own stdout/stderr go to a pipe and are shown when the run fails.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from .console import ConsoleScanner, Problem
from .initramfs import Kernel, run_archive

QEMU = "qemu-system-x86_64"
INIT_MARKER = "umem-vm: init started"
STATUS_PORT = "org.umem.vm.status"
KERNEL_CMDLINE = (
    "console=ttyS0 panic=-1 oops=panic panic_on_warn=1 loglevel=5 "
    "net.ifnames=0 rdinit=/init"
)
UDEV_NO_AUTOLOAD = b"# umem test VM: no module autoloading by udev (tests/harness/vm/qemu.py)\n"
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class VMConfig:
    kernel: Kernel
    initramfs: Path  # the cached base archive
    checkout: Path
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    accel: str = "tcg"  # "kvm" or "tcg"
    cpu: str | None = None  # -cpu model; None: "host" under KVM, "max" under TCG
    memory: str = "4G"
    cpus: int = 2
    tb_size: int = 512  # MiB of TCG translation cache
    checkout_cache: str = "loose"
    net: bool = False
    hostfwd: list[tuple[int, int]] = field(default_factory=list)
    udev: bool = False  # run systemd-udevd (implied by udev_rules)
    udev_rules: list[Path] = field(default_factory=list)
    timeout: float = 900.0
    console_log: Path = Path("build/vm-console.log")
    verbose: bool = False


@dataclass
class RunResult:
    status: int | None  # the command's exit status, None if none arrived
    elapsed: float
    problems: list[Problem]
    timed_out: bool = False
    marker_seen: bool = False
    output_newline: bool = True  # the command's output ended with a newline
    qemu_returncode: int | None = None
    qemu_output: str = ""


def _qemu_path(path: Path | str) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(path).replace(",", ",,")


def guest_env(cfg: VMConfig) -> dict[str, str]:
    """The command's environment: a clean one plus the --env values."""
    venv = cfg.checkout / ".venv"
    env = {
        "HOME": "/tmp",
        "PATH": f"{venv}/bin:{GUEST_PATH}",
        "LANG": "C.UTF-8",
        "TERM": os.environ.get("TERM", "dumb") if sys.stdout.isatty() else "dumb",
        "PAGER": "cat",
        "GIT_PAGER": "cat",
        "UMEM_VM": "1",
    }
    if venv.is_dir():
        env["VIRTUAL_ENV"] = str(venv)
    env.update(cfg.env)
    return env


def runs_udev(cfg: VMConfig) -> bool:
    return cfg.udev or bool(cfg.udev_rules)


def guest_modules_dir(kernel: Kernel) -> str:
    """The kernel's modules directory when it is not the host's own
    /lib/modules/RELEASE (the init binds it there), else ""."""
    own = Path("/lib/modules") / kernel.release
    return "" if kernel.modules_dir.resolve() == own.resolve() else str(kernel.modules_dir)


def run_files(cfg: VMConfig) -> dict[str, bytes]:
    """The per-run files: run.conf (sourced by init.sh) and udev rules."""
    stty = ""
    if sys.stdout.isatty():
        size = shutil.get_terminal_size()
        stty = f"cols {size.columns} rows {size.lines}"
    env_args = [f"{k}={v}" for k, v in guest_env(cfg).items()]
    conf = [
        f"UMEM_VM_CHECKOUT={shlex.quote(str(cfg.checkout))}",
        f"UMEM_VM_CHECKOUT_CACHE={shlex.quote(cfg.checkout_cache)}",
        f"UMEM_VM_NET={int(cfg.net or bool(cfg.hostfwd))}",
        f"UMEM_VM_UDEV={int(runs_udev(cfg))}",
        f"UMEM_VM_STTY={shlex.quote(stty)}",
        f"UMEM_VM_MODULES={shlex.quote(guest_modules_dir(cfg.kernel))}",
        f"UMEM_VM_RELEASE={shlex.quote(cfg.kernel.release)}",
        "set -- " + " ".join(shlex.quote(a) for a in env_args + cfg.command),
    ]
    files = {"etc/umem-vm/run.conf": "\n".join(conf).encode() + b"\n"}
    for rules in cfg.udev_rules:
        files[f"etc/umem-vm/rules.d/{rules.name}"] = rules.read_bytes()
    if runs_udev(cfg) and "80-drivers.rules" not in {r.name for r in cfg.udev_rules}:
        # Mask Debian's rule that modprobes every device's modalias: coldplug
        # would load ~40 modules (AHCI, crypto, watchdog...), 15 s under TCG.
        files["etc/umem-vm/rules.d/80-drivers.rules"] = UDEV_NO_AUTOLOAD
    return files


def qemu_command(cfg: VMConfig, initrd: Path, sockets: dict[str, Path]) -> list[str]:
    if cfg.accel == "kvm":
        accel = ["-accel", "kvm", "-cpu", cfg.cpu or "host"]
    else:
        # -cpu max: TCG emulates SVM, so the guest can load kvm_amd.
        accel = ["-accel", f"tcg,thread=multi,tb-size={cfg.tb_size}", "-cpu", cfg.cpu or "max"]
    fs = "security_model=none,multidevs=remap"
    args = [
        QEMU, "-nodefaults", "-no-reboot", "-display", "none",
        "-machine", "q35", *accel, "-smp", str(cfg.cpus), "-m", cfg.memory,
        "-kernel", str(cfg.kernel.vmlinuz), "-initrd", str(initrd),
        "-append", KERNEL_CMDLINE,
        "-chardev", f"socket,id=console,path={sockets['console']}",
        "-serial", "chardev:console",
        "-chardev", f"socket,id=output,path={sockets['output']}",
        "-serial", "chardev:output",
        "-device", "virtio-serial-pci,id=vser",
        "-chardev", f"socket,id=status,path={sockets['status']}",
        "-device", f"virtserialport,bus=vser.0,chardev=status,name={STATUS_PORT}",
        "-fsdev", f"local,id=hostroot,path=/,readonly=on,{fs}",
        "-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
        "-fsdev", f"local,id=checkout,path={_qemu_path(cfg.checkout)},{fs}",
        "-device", "virtio-9p-pci,fsdev=checkout,mount_tag=checkout",
    ]
    if cfg.net or cfg.hostfwd:
        fwd = "".join(f",hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in cfg.hostfwd)
        args += ["-netdev", f"user,id=net0{fwd}",
                 "-device", "virtio-net-pci,netdev=net0"]
    return args


def _status_request(line: str, result: RunResult) -> bytes:
    """Answer one line the init sent on the status port.

    "time?" -> "time SECONDS.NANOSECONDS": the host's clock, so that guest and
    9p (host) timestamps agree (the RTC has a resolution of one second);
    "status N" -> "ok": N is the command's exit status.
    """
    if line == "time?":
        ns = time.time_ns()
        return f"time {ns // 10**9}.{ns % 10**9:09d}\n".encode()
    word, _, arg = line.partition(" ")
    if word == "status" and result.status is None:
        result.status = int(arg) if arg.isdigit() else 255
        return b"ok\n"
    return b"error\n"


def _die_with_parent(parent: int) -> None:
    """QEMU's preexec_fn: SIGKILL it if the harness dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
    if os.getppid() != parent:  # the harness died before prctl
        os._exit(1)


def run_vm(cfg: VMConfig, *, marker_timeout: float | None = None,
           out: BinaryIO | None = None) -> RunResult:
    """Boot the VM, run the command, return what happened.

    With ``marker_timeout`` (the accelerator probe) the VM is killed as soon as
    the init prints its first line, or after that many seconds without it.
    """
    out = out if out is not None else sys.stdout.buffer
    scanner = ConsoleScanner()
    cfg.console_log.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="umem-vm-") as tmp, \
            cfg.console_log.open("wb") as log, \
            selectors.DefaultSelector() as sel:
        initrd = Path(tmp) / "initrd"
        with initrd.open("wb") as f, cfg.initramfs.open("rb") as base:
            shutil.copyfileobj(base, f)
            f.write(run_archive(run_files(cfg)))
        sockets = {}
        for role in ("console", "output", "status"):
            sockets[role] = Path(tmp) / f"{role}.sock"
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(sockets[role]))
            listener.listen(1)
            sel.register(listener, selectors.EVENT_READ, ("listen", role))

        start = time.monotonic()
        parent = os.getpid()
        proc = subprocess.Popen(qemu_command(cfg, initrd, sockets), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: _die_with_parent(parent))
        assert proc.stdout is not None
        fcntl.fcntl(proc.stdout, fcntl.F_SETFL, os.O_NONBLOCK)
        sel.register(proc.stdout, selectors.EVENT_READ, ("qemu", "qemu"))
        result = RunResult(None, 0.0, scanner.problems)
        qemu_output = bytearray()
        status_buf = b""
        open_streams = 1  # QEMU's stdout, then each accepted chardev

        def kill() -> None:
            if proc.poll() is None:
                proc.kill()

        try:
            while open_streams:
                now = time.monotonic()
                deadline = start + cfg.timeout
                if marker_timeout is not None and not result.marker_seen:
                    deadline = min(deadline, start + marker_timeout)
                if now >= deadline:
                    result.timed_out = marker_timeout is None or result.marker_seen
                    kill()
                for key, _ in sel.select(max(0.0, deadline - now) + 0.05):
                    kind, role = key.data
                    if kind == "listen":
                        conn, _ = key.fileobj.accept()  # type: ignore[union-attr]
                        conn.setblocking(False)
                        sel.unregister(key.fileobj)
                        key.fileobj.close()  # type: ignore[union-attr]
                        sel.register(conn, selectors.EVENT_READ, ("stream", role))
                        open_streams += 1
                        continue
                    try:
                        data = (os.read(key.fd, 65536) if kind == "qemu"
                                else key.fileobj.recv(65536))  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    except ConnectionResetError:
                        data = b""
                    if not data:
                        sel.unregister(key.fileobj)
                        if kind != "qemu":
                            key.fileobj.close()  # type: ignore[union-attr]
                        open_streams -= 1
                        continue
                    if role == "qemu":
                        qemu_output += data
                    elif role == "output":
                        out.write(data)
                        out.flush()
                        result.output_newline = data.endswith(b"\n")
                    elif role == "console":
                        log.write(data)
                        log.flush()
                        for line in scanner.feed(data):
                            if cfg.verbose:
                                print(f"[console] {line}", flush=True)
                            if line.startswith(INIT_MARKER):
                                result.marker_seen = True
                                if marker_timeout is not None:
                                    kill()
                    elif role == "status":
                        status_buf += data
                        *lines, status_buf = status_buf.split(b"\n")
                        for request in lines:
                            reply = _status_request(request.decode(errors="replace"), result)
                            key.fileobj.sendall(reply)  # type: ignore[union-attr]
        finally:
            kill()
            result.qemu_returncode = proc.wait()
            proc.stdout.close()
        for line in scanner.finish():
            if cfg.verbose:
                print(f"[console] {line}", flush=True)
        result.elapsed = time.monotonic() - start
        result.qemu_output = qemu_output.decode(errors="replace")
        return result


# --- choosing the accelerator -------------------------------------------------

KVM_GET_API_VERSION = 0xAE00


def kvm_usable() -> bool:
    """/dev/kvm opens read-write and speaks KVM API version 12."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION) == 12
    except OSError:
        return False
    finally:
        os.close(fd)


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU, "--version"], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"{QEMU} does not run ({e}): apt-get install qemu-system-x86") \
            from e
    return out.splitlines()[0]


def verdict_path(cache_dir: Path) -> Path:
    """Where the probe's verdict is cached: keyed by host kernel and QEMU."""
    key = f"{os.uname().release}\n{qemu_version()}\n"
    return cache_dir / f"accel-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def choose_accel(requested: str, cfg: VMConfig, cache_dir: Path,
                 probe_timeout: float = 20.0) -> tuple[str, str]:
    """Resolve "auto" to "kvm" or "tcg"; return (accel, reason)."""
    if requested in ("kvm", "tcg"):
        return requested, "requested"
    if not kvm_usable():
        return "tcg", "/dev/kvm is not usable"
    path = verdict_path(cache_dir)
    try:
        verdict = json.loads(path.read_text())
        return verdict["accel"], f"cached probe verdict ({path}): {verdict['reason']}"
    except (OSError, ValueError, KeyError):
        pass
    probe_cfg = dataclasses.replace(
        cfg, accel="kvm", command=["true"], console_log=path.with_suffix(".console.log"),
        verbose=False, net=False, hostfwd=[], udev=False, udev_rules=[])
    with open(os.devnull, "wb") as devnull:
        result = run_vm(probe_cfg, marker_timeout=probe_timeout, out=devnull)
    if result.marker_seen:
        accel, reason = "kvm", f"KVM boot reached init in {result.elapsed:.1f} s"
    elif result.qemu_returncode not in (None, 0, -9) and result.elapsed < probe_timeout:
        first = (result.qemu_output.strip().splitlines() or ["?"])[0]
        accel, reason = "tcg", f"KVM boot aborted: {first}"
    else:
        accel, reason = "tcg", f"KVM boot did not reach init within {probe_timeout:.0f} s"
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"accel": accel, "reason": reason}) + "\n")
    tmp.replace(path)
    return accel, f"probed: {reason}"
