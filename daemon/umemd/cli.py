"""The umemd command line.

Exit codes: 0 success, 1 an operation failed (the message says what and
how to fix it), 2 bad usage, 3 the umem module is not loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from umemd.device import CONTROL_PATH, Control
from umemd.errors import ModuleNotLoadedError, UmemError

log = logging.getLogger("umemd")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MODULE = 3

DESCRIPTION = """\
umemd manages umem instances: memory whose pages a userspace server supplies
on demand, mapped by QEMU as guest RAM during a post-copy live migration.
Each instance is /dev/umem/NAME; /dev/umem/control (root only) creates and
removes them.
"""

EPILOG = f"""\
exit status:
  0  success
  {EXIT_FAILED}  the operation failed; the message names the problem and the fix
  {EXIT_USAGE}  bad usage
  {EXIT_NO_MODULE}  {CONTROL_PATH} does not exist: load the module (insmod kernel/umem.ko)

See docs/kernel-abi.md for the device and docs/ for the rest.
"""


def cmd_list(args: argparse.Namespace) -> int:
    with Control(args.control) as control:
        instances = control.list()
    if args.json:
        print(json.dumps([asdict(i) for i in instances], indent=2))
        return 0
    print(f"{'NAME':<24} {'SIZE':>12} {'PRESENT':>10} SERVER")
    for i in instances:
        print(f"{i.name:<24} {i.size:>12} {i.present:>10} {'yes' if i.served else 'no'}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with Control(args.control) as control, control.attach(args.name) as server:
        print(json.dumps(asdict(server.stats()), indent=2))
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    with Control(args.control) as control:
        control.destroy(args.name)
    log.info("destroyed umem instance %r", args.name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umemd", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    parser.add_argument("--control", type=Path, default=CONTROL_PATH, metavar="PATH",
                        help=f"the umem control node (default: {CONTROL_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="list umem instances", description="List every umem instance: its name, size "
                       "in bytes, pages present, and whether a server fd is open.")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("stats", help="print an instance's counters", description="Attach to instance NAME (which "
                       "must have no server attached) and print its counters as JSON: pages present, faults, "
                       "waiters, total wait time, pages filled, zeroed and skipped.")
    p.add_argument("name", metavar="NAME", help="instance name")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("destroy", help="remove an instance", description="Remove /dev/umem/NAME at once. Its memory "
                       "lives until the last mapping and fd are gone; if pages are still missing, tasks touching "
                       "them get SIGBUS.")
    p.add_argument("name", metavar="NAME", help="instance name")
    p.set_defaults(func=cmd_destroy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="umemd: %(message)s")
    try:
        status: int = args.func(args)
    except ModuleNotLoadedError as e:
        log.error("%s", e)
        return EXIT_NO_MODULE
    except UmemError as e:
        log.error("%s", e)
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
