"""python3 -m tests.harness.vm [options] -- COMMAND...: run COMMAND in the test VM."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from tests.harness import CHECKOUT

from .console import PATTERNS, excerpt
from .initramfs import DEFAULT_CACHE_DIR, InitramfsError, cached_initramfs, find_kernel, find_kernel_in
from .qemu import RunResult, VMConfig, choose_accel, run_vm

# Exit codes of the harness itself (the command's own code is passed through).
EXIT_TIMEOUT = 124
EXIT_VM_FAILURE = 125

DESCRIPTION = """\
Boot the Debian kernel in QEMU with a minimal busybox initramfs, the host root
shared read-only (under a tmpfs overlay) and the checkout read-write at its
own path, run COMMAND there as root (cwd = checkout, HOME=/tmp, PATH starting
with <checkout>/.venv/bin, UMEM_VM=1) and exit with its status.

The command's stdout/stderr arrive on our stdout; the kernel console goes to
--console-log (and to stdout with --verbose).  The run fails with 125 if no
exit status arrives (panic, crash) or the console shows a kernel WARNING,
BUG, Oops, Call Trace, panic, GPF, UBSAN or KASAN report, and with 124 on
--timeout.  See docs/testing.md."""

EPILOG = """\
examples:
  python3 -m tests.harness.vm -- true
  python3 -m tests.harness.vm --udev -- python -m pytest tests/kernel
  python3 -m tests.harness.vm --hostfwd 4444:4444 -- python3 -m http.server 4444
  UMEM_VM_ACCEL=tcg python3 -m tests.harness.vm --env FOO=1 -- sh -c 'echo $FOO'"""


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not name.replace("_", "a").isalnum():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _port_pair(text: str) -> tuple[int, int]:
    try:
        host, guest = (int(p) for p in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOSTPORT:GUESTPORT, got {text!r}") from None
    if not (0 < host < 65536 and 0 < guest < 65536):
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, guest


def _rules_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such udev rules file: {text}")
    return path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.harness.vm", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("command", nargs="+", metavar="COMMAND", help="command and arguments (after --)")
    add("--accel", choices=("auto", "kvm", "tcg"),
        default=os.environ.get("UMEM_VM_ACCEL", "auto"),
        help="accelerator (default: $UMEM_VM_ACCEL or auto: KVM if a probe boot "
             "works on this machine, else TCG; the verdict is cached)")
    add("--cpu", metavar="MODEL",
        help="QEMU -cpu model (default: max under TCG, which emulates SVM for nested "
             "KVM; host under KVM)")
    add("--memory", "-m", default="4G", help="guest RAM (default: 4G)")
    add("--cpus", "-c", type=int, default=2, help="vCPUs (default: 2)")
    add("--tb-size", type=int, default=512, metavar="MIB",
        help="TCG translation cache size in MiB (default: 512)")
    add("--timeout", type=float, default=900.0, metavar="SECONDS",
        help="wall-clock limit for boot + command (default: 900)")
    add("--env", "-e", type=_env_pair, action="append", default=[], metavar="NAME=VALUE",
        help="set a variable in the command's environment (repeatable)")
    add("--udev", action="store_true",
        help="run systemd-udevd (trigger + settle before the command)")
    add("--udev-rules", type=_rules_file, action="append", default=[], metavar="RULES_FILE",
        help="install these udev rules in /run/udev/rules.d; implies --udev (repeatable)")
    add("--net", action="store_true",
        help="user-mode network on eth0 (10.0.2.15/24, gateway 10.0.2.2)")
    add("--hostfwd", type=_port_pair, action="append", default=[],
        metavar="HOSTPORT:GUESTPORT",
        help="forward 127.0.0.1:HOSTPORT to the guest's GUESTPORT (TCP; implies "
             "--net) (repeatable)")
    add("--checkout-cache", default="loose", choices=("loose", "mmap", "none"),
        help="9p cache mode of the read-write checkout mount (default: loose)")
    add("--console-log", type=Path, default=CHECKOUT / "build" / "vm-console.log",
        metavar="FILE", help="kernel console log (default: build/vm-console.log)")
    add("--verbose", "-v", action="store_true",
        help="also stream the kernel console to stdout, prefixed [console]")
    add("--kernel", metavar="RELEASE",
        help="kernel release (default: newest in /lib/modules with a /boot/vmlinuz)")
    add("--kernel-root", type=Path, metavar="DIR",
        help="boot a kernel installed under DIR instead of the host's: DIR/boot/vmlinuz-RELEASE "
             "and DIR/lib/modules/RELEASE, bound over /lib/modules/RELEASE in the guest "
             "(the debug kernel, a newer Debian kernel)")
    add("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR",
        help=f"initramfs and probe cache (default: {DEFAULT_CACHE_DIR})")
    return parser.parse_args(argv)


def died_before_init(result: RunResult) -> bool:
    """A boot that ended without the init's first line: the kernel itself failed (seen once: the
    debug kernel under TCG, "KASAN: wild-memory-access in do_raw_spin_lock" from an interrupt
    in start_kernel), not the command, the module or anything else of the checkout: worth one
    more boot. A timeout is not (it may be the command's)."""
    return result.status is None and not result.marker_seen and not result.timed_out


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # On SIGTERM, unwind: run_vm kills QEMU and removes its temporary files.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        kernel = (find_kernel_in(args.kernel_root, args.kernel) if args.kernel_root
                  else find_kernel(args.kernel))
        initramfs = cached_initramfs(kernel, args.cache_dir)
    except InitramfsError as e:
        print(f"umem-vm: error: {e}", file=sys.stderr)
        return EXIT_VM_FAILURE
    cfg = VMConfig(
        kernel=kernel, initramfs=initramfs, checkout=CHECKOUT, command=args.command,
        env=dict(args.env), cpu=args.cpu, memory=args.memory, cpus=args.cpus, tb_size=args.tb_size,
        checkout_cache=args.checkout_cache, net=args.net, hostfwd=args.hostfwd,
        udev=args.udev, udev_rules=args.udev_rules, timeout=args.timeout, console_log=args.console_log,
        verbose=args.verbose)
    cfg.accel, reason = choose_accel(args.accel, cfg, args.cache_dir)
    if args.verbose:
        print(f"umem-vm: kernel {kernel.release}, accel {cfg.accel} ({reason})", flush=True)

    result = run_vm(cfg)
    if died_before_init(result):
        first = cfg.console_log.with_suffix(".first-boot.log")
        if cfg.console_log.exists():
            cfg.console_log.replace(first)
        print(f"umem-vm: the kernel died before the init started, so before anything of the checkout "
              f"ran ({'; '.join(str(p) for p in result.problems[:2]) or 'no exit status'}; console kept in "
              f"{first}): booting once more", file=sys.stderr, flush=True)
        result = run_vm(cfg)
    if not result.output_newline and sys.stdout.isatty():
        print(flush=True)

    errors = []
    if result.timed_out:
        errors.append(f"timeout: no result within {cfg.timeout:.0f} s; QEMU killed")
    elif result.status is None:
        errors.append("no exit status arrived from the VM (kernel panic, crash or "
                      "init failure: see the console above)")
    problems = result.problems
    errors += [f"kernel problem on the console: {p}" for p in problems[:5]]
    if len(problems) > 5:
        errors.append(f"... and {len(problems) - 5} more console lines matching "
                      f"{', '.join(PATTERNS)}")
    if errors:
        if not cfg.verbose:
            lines = cfg.console_log.read_text(errors="replace").replace("\r", "").splitlines()
            print(f"umem-vm: console ({cfg.console_log}):", file=sys.stderr)
            for line in excerpt(lines, problems):
                print(f"[console] {line}", file=sys.stderr)
        if result.qemu_output.strip():
            print(f"umem-vm: QEMU said:\n{result.qemu_output.rstrip()}", file=sys.stderr)
        for error in errors:
            print(f"umem-vm: error: {error}", file=sys.stderr)
    code = (EXIT_TIMEOUT if result.timed_out else EXIT_VM_FAILURE if errors
            else result.status)
    assert code is not None
    status = "none" if result.status is None else str(result.status)
    print(f"umem-vm: accel={cfg.accel} boot+run={result.elapsed:.1f}s status={status} "
          f"exit={code}{' FAILED' if errors else ''}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
