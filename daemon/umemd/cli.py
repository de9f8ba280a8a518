"""The umemd command line: serve, pull, migrate, keygen, list, stats, destroy.

Exit codes: 0 success, 1 an operation failed (the message says what and
how to fix it), 2 bad usage, 3 the umem module is not loaded, 4 the pull
lost its page server for longer than --source-timeout (the instance stays).
"""

from __future__ import annotations

import argparse
import grp
import json
import logging
import os
import pwd
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from umemd.destination import Puller, open_instance
from umemd.device import CONTROL_PATH, Control, NodeOwner, read_counters
from umemd.errors import MigrationAbortedError, ModuleNotLoadedError, SourceLostError, UmemError
from umemd.planner import PREPAGE
from umemd.priority import short_gil_slices
from umemd.protocol import MIGRATION_ID_SIZE, Role
from umemd.ramfile import RamFile
from umemd.session import SourceEvent, SourceGate
from umemd.source import PageServer
from umemd.stats import LOG_EVERY, ProgressLine, PullStats
from umemd.status import PullState, StatusServer, present_pages, status_document
from umemd.transport import PEER_TIMEOUT, Dialer, Endpoint, TlsFiles

log = logging.getLogger("umemd")

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NO_MODULE = 3
EXIT_SOURCE_LOST = 4
SOURCE_TIMEOUT = 600.0  # default --source-timeout

DESCRIPTION = """\
umemd moves a guest's RAM after a post-copy live migration. On the
destination, `umemd pull` holds a umem instance (/dev/umem/NAME, which the
destination QEMU maps as guest RAM): every page the guest touches is asked
of the source at once, and the rest streams in the background. On the
source, `umemd serve` serves the stopped guest's RAM file. The two speak an
authenticated protocol over two TCP connections (docs/protocol.md); either
side may listen, the other connects.

typical use (destination listens):
  dst# umemd keygen /etc/umem/key        (copy the key to the source)
  dst# umemd migration-id                (new for every migration: e.g. 5f0c...)
  dst# umemd pull vm1 --size 512M --owner libvirt-qemu:kvm --listen 0.0.0.0:4444 \\
           --key-file /etc/umem/key --migration-id 5f0c...
  src# umemd serve /dev/shm/vm1-ram --connect dst:4444 --key-file /etc/umem/key \\
           --migration-id 5f0c... --qmp /run/vm1.qmp
"""

EPILOG = f"""\
exit status:
  0  success
  {EXIT_FAILED}  the operation failed; the message names the problem and the fix
  {EXIT_USAGE}  bad usage
  {EXIT_NO_MODULE}  {CONTROL_PATH} does not exist: load the module (insmod kernel/umem.ko)
  {EXIT_SOURCE_LOST}  pull: no page server for --source-timeout seconds; the instance stays (restart
     umemd serve, then umemd pull: it attaches)

See docs/kernel-abi.md for the device and docs/ for the rest.
"""


def cmd_list(args: argparse.Namespace) -> int:
    with Control(args.control) as control:
        instances = control.list()
    if args.json:
        print(json.dumps([asdict(i) for i in instances], indent=2))
        return 0
    print(f"{'NAME':<24} {'SIZE':>12} {'PRESENT':>10} {'SERVER':<6} TAG")
    for i in instances:
        print(f"{i.name:<24} {i.size:>12} {i.present:>10} {'yes' if i.served else 'no':<6} {i.tag}")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    print(json.dumps(asdict(read_counters(args.name)), indent=2))
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    with Control(args.control) as control:
        control.destroy(args.name)
    log.info("destroyed umem instance %r", args.name)
    return 0


def parse_size(text: str) -> int:
    """Bytes from '536870912', '512M', '4G' (binary units)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        return int(text[:-1]) * units[text[-1]] if text and text[-1] in units else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 536870912, 512M, 4G)") from None


def _lookup(kind: str, text: str, by_name: Callable[[str], Any], field: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return int(getattr(by_name(text), field))
    except KeyError:
        raise argparse.ArgumentTypeError(f"no {kind} {text!r} on this host (give a name from "
                                         f"/etc/{'passwd' if kind == 'user' else 'group'} or a number)") from None


def parse_owner(text: str) -> tuple[int, int]:
    """(uid, gid) from 'USER', 'USER:GROUP', 'UID:GID' (no group: root)."""
    user, _, group = text.partition(":")
    if not user:
        raise argparse.ArgumentTypeError(f"{text!r}: give a user, e.g. libvirt-qemu or libvirt-qemu:kvm")
    uid = _lookup("user", user, pwd.getpwnam, "pw_uid")
    return uid, _lookup("group", group, grp.getgrnam, "gr_gid") if group else 0


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        mode = -1
    if not 0 < mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r} is not a mode from 1 to 0777 (octal, e.g. 0600)")
    return mode


def node_owner(args: argparse.Namespace) -> NodeOwner:
    uid, gid = args.owner or (0, 0)
    return NodeOwner(uid, gid, args.mode)


def read_key(path: Path) -> bytes:
    """The hex key ``umemd keygen`` writes, from a file only its owner can read."""
    try:
        mode = path.stat().st_mode
        raw = path.read_bytes().strip()
    except OSError as e:
        raise UmemError(f"cannot read the key file {path}: {e.strerror} (make one with umemd keygen FILE)") from e
    if mode & 0o077:
        raise UmemError(f"the key file {path} is readable or writable by group or others (mode {mode & 0o777:04o}): "
                        f"chmod 600 {path}")
    try:
        key = bytes.fromhex(raw.decode())
    except (UnicodeDecodeError, ValueError):
        raise UmemError(f"the key file {path} does not hold a hex key: make one with umemd keygen FILE") from None
    if len(key) < 32:
        raise UmemError(f"the key in {path} is {len(key)} bytes; at least 32 are needed (umemd keygen FILE)")
    return key


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def positive_seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return seconds


def parse_migration_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != MIGRATION_ID_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is not a migration id: {2 * MIGRATION_ID_SIZE} hex digits "
                                         "(umemd migration-id prints a new one)")
    return raw


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    if not args.tls_cert:
        if args.tls_key or args.tls_ca or args.tls_peer_cert or args.tls_name:
            raise UmemError("TLS options without --tls-cert: give --tls-cert and --tls-key too")
        return None
    if not args.tls_key:
        raise UmemError("--tls-cert needs --tls-key (the certificate's private key)")
    if args.listen and args.tls_ca and not args.tls_name:
        raise UmemError("a listening daemon with --tls-ca needs --tls-name: the name on the peer's certificate "
                        "(or pin it with --tls-peer-cert)")
    return TlsFiles(args.tls_cert, args.tls_key, args.tls_ca, args.tls_name, args.tls_peer_cert)


def dialer_for(args: argparse.Namespace, role: Role, stop: threading.Event) -> Dialer:
    tls = tls_files(args)
    endpoint = args.listen or args.connect
    try:
        return Dialer(role, read_key(args.key_file), args.migration_id, endpoint, listen=args.listen is not None,
                      tls=tls, stop=stop, peer_timeout=args.peer_timeout)
    except OSError as e:
        raise UmemError(f"cannot listen on {endpoint}: {e.strerror or e}") from e


def cmd_migration_id(args: argparse.Namespace) -> int:
    print(secrets.token_hex(MIGRATION_ID_SIZE))
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UmemError(f"{path} exists: keygen never overwrites a key (remove it first, or pick another "
                        "name)") from None
    except OSError as e:
        raise UmemError(f"cannot create the key file {path}: {e.strerror}") from e
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    log.info("wrote a new key to %s (mode 0600): copy it to the other host", path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    short_gil_slices()
    ram = RamFile(args.ramfile)
    stop = threading.Event()
    gate = SourceGate(lambda phase, reason: server.on_phase(phase, reason))
    dialer = dialer_for(args, Role.SOURCE, stop)
    server = PageServer(ram, dialer, gate, prepage=args.prepage,
                        push_rate=args.max_push_rate * 2**20 if args.max_push_rate else None)
    if args.guest_stopped_for_good:
        gate.handle(SourceEvent.OPERATOR_STOPPED)
    else:
        from umemd.qmpwatch import watch_source

        watch_source(args.qmp, gate)
    try:
        status = server.run()
    finally:
        stop.set()
        dialer.close()
    if args.report:
        args.report.write_text(json.dumps(asdict(server.stats), indent=2) + "\n")
    return status


def cmd_migrate(args: argparse.Namespace) -> int:
    # asyncio and qemu.qmp are imported here, not at the top: pull's start-up (seconds
    # under TCG, and a restarted pull keeps faulting vCPUs waiting) does not pay for them.
    import asyncio

    from umemd.migrate import MigrateOptions, QmpAddress, migrate
    from umemd.report import summary, write_plot
    progress = ProgressLine(sys.stderr.isatty(), width=160)
    incoming = args.incoming or args.uri  # listen exactly where the source connects, never on every interface
    opts = MigrateOptions(QmpAddress(args.src_qmp), QmpAddress(args.dst_qmp), args.dst_status, args.uri, incoming,
                          ready_timeout=args.ready_timeout, release_timeout=args.release_timeout,
                          timeout=args.timeout, keep_source=args.keep_source,
                          progress=None if args.quiet else progress.show)
    report = asyncio.run(migrate(opts))
    if not args.quiet:
        progress.end()
    print(summary(report), flush=True)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        write_plot(report, args.plot)
        log.info("plot written to %s", args.plot)
    return 0


def wait_for_module(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not CONTROL_PATH.exists() and time.monotonic() < deadline:
        time.sleep(0.2)


def cmd_pull(args: argparse.Namespace) -> int:
    if args.wait_module:
        wait_for_module(args.wait_module)
    short_gil_slices()
    stop = threading.Event()
    with Control(args.control) as control:
        server, attached = open_instance(control, args.name, args.size, args.migration_id, node_owner(args),
                                         args.cgroup)
        stats = PullStats(args.name, server.pages, attached=attached)
        if args.latency_log:
            stats.latency.keep_samples()
        dialer = dialer_for(args, Role.DESTINATION, stop)
        puller = Puller(control, server, dialer, stats, source_timeout=args.source_timeout or None)
        status = StatusServer(args.status, lambda: status_document(puller, puller.state)) if args.status else None
        progress = Progress(puller, sys.stderr.isatty() and not args.quiet)
        progress.start()
        if status:
            puller.on_release = status.update
            status.start()
        state = PullState.FAILED
        try:
            puller.run()
            state = PullState.COMPLETE
        except MigrationAbortedError:
            state = PullState.ABORTED
            raise
        except SourceLostError:
            state = PullState.SOURCE_LOST
            raise
        finally:
            progress.stop()
            stop.set()
            dialer.close()
            present = present_pages(server)
            last = status_document(puller, state, present)
            if status:
                status.finish(last)
            if args.report:  # the status endpoint's last line (docs/protocol.md): the state with the counts
                args.report.write_text(json.dumps(last, indent=2) + "\n")
            if args.latency_log:
                stats.write_latency_log(args.latency_log)
            server.close()
    log.info("%s", stats.progress_line(present))
    return 0


class Progress(threading.Thread):
    """The pull's progress line, every 0.5 s on a terminal, else every :data:`LOG_EVERY` s."""

    def __init__(self, puller: Puller, tty: bool) -> None:
        super().__init__(name="umemd-progress", daemon=True)
        self.puller = puller
        self.line = ProgressLine(tty, log_every=0.0)  # paced by this thread
        self._stop_event = threading.Event()

    def run(self) -> None:
        interval = 0.5 if self.line.tty else LOG_EVERY
        while not self._stop_event.wait(interval):
            self.line.show(self.puller.stats.progress_line(self.puller.present()))

    def stop(self) -> None:
        self._stop_event.set()
        self.line.end()


def add_link_options(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", type=Endpoint.parse, metavar="HOST:PORT",
                       help="wait for the peer to connect here (both channels use this port)")
    where.add_argument("--connect", type=Endpoint.parse, metavar="HOST:PORT",
                       help="connect to the peer there, retrying with backoff until it answers")
    p.add_argument("--key-file", type=Path, required=True, metavar="FILE",
                   help="the shared key (umemd keygen FILE); a peer without it is refused before any page")
    p.add_argument("--migration-id", type=parse_migration_id, required=True, metavar="HEX",
                   help="which migration this is: the same 32 hex digits on both daemons, new for every "
                   "migration and every retry (umemd migration-id prints one); a peer, or a leftover instance, "
                   "of another migration is refused")
    p.add_argument("--peer-timeout", type=positive_seconds, default=PEER_TIMEOUT, metavar="SECONDS",
                   help="a connection that brings nothing for this long is lost (keepalives flow while idle), "
                   f"and so is a whole handshake that takes longer (default {PEER_TIMEOUT:g})")
    p.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="use TLS with this certificate (and --tls-key); the peer is verified by --tls-ca and "
                   "--tls-name, or by --tls-peer-cert. Without TLS, every frame carries a MAC under the key "
                   "(integrity) but pages travel in the clear: use TLS on networks you do not trust")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="the private key of --tls-cert")
    p.add_argument("--tls-ca", type=Path, metavar="PEM", help="accept a peer certificate signed by this CA ...")
    p.add_argument("--tls-name", metavar="NAME",
                   help="... and carrying this name (DNS or IP subject alternative name; default on the "
                   "connecting side: the host of --connect; required on the listening side)")
    p.add_argument("--tls-peer-cert", type=Path, metavar="PEM",
                   help="accept exactly this peer certificate (pinned; instead of --tls-ca)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="umemd", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail to stderr")
    parser.add_argument("--control", type=Path, default=CONTROL_PATH, metavar="PATH",
                        help=f"the umem control node (default: {CONTROL_PATH})")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="destination: serve a guest's faults and pull all of its RAM",
                       description="Create umem instance NAME of --size bytes (or attach to it if it exists, "
                       "after a restart) and make every page present: pages the guest touches are asked of the "
                       "source at once on the demand channel, the rest arrive on the push channel. When every "
                       "page is present the instance's node is destroyed (the guest keeps its memory) and "
                       "umemd exits 0. Start it before the destination QEMU's migrate-incoming.")
    p.add_argument("name", metavar="NAME", help="instance name: QEMU maps /dev/umem/NAME")
    p.add_argument("--size", type=parse_size, required=True, help="guest RAM size (bytes, or with K/M/G/T)")
    add_link_options(p)
    p.add_argument("--owner", type=parse_owner, metavar="USER[:GROUP]",
                   help="give the node to the QEMU that will map it (names or numbers; default root:root); "
                   "nobody else but root can open it")
    p.add_argument("--mode", type=parse_mode, default=0o600, metavar="OCTAL",
                   help="the node's permission bits (default 0600: the owner only)")
    p.add_argument("--cgroup", type=Path, metavar="DIR",
                   help="charge the guest's RAM to this cgroup2 directory, e.g. the destination QEMU's "
                   "(default: the cgroup of the first process that maps the node)")
    p.add_argument("--wait-module", type=float, default=0, metavar="SECONDS",
                   help="wait this long for the umem module to be loaded (default: fail at once)")
    p.add_argument("--report", type=Path, metavar="FILE.json",
                   help="write counts, bytes, durations and the fault-latency histogram here")
    p.add_argument("--latency-log", type=Path, metavar="FILE",
                   help="at exit, write every served fault here: when it was read (Unix time) and its latency "
                   "in µs, one per line")
    p.add_argument("--status", type=Endpoint.parse, metavar="HOST:PORT",
                   help="serve progress as JSON lines to whoever connects here, every 0.25 s and a last line "
                   "at the end (umemd migrate --dst-status reads it; read-only, but bind it to a trusted "
                   "network)")
    p.add_argument("--source-timeout", type=float, default=SOURCE_TIMEOUT, metavar="SECONDS",
                   help="exit with status 4 after this long without a page server (counted from the start "
                   f"and from each loss), leaving the instance for a restarted pull to attach to "
                   f"(default {SOURCE_TIMEOUT:g}; 0: wait for ever)")
    p.add_argument("--quiet", action="store_true", help="no progress line on a terminal")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("serve", help="source: serve a stopped guest's RAM file to one destination",
                       description="Serve RAMFILE (the source QEMU's memory-backend-file mem-path, share=on) to "
                       "one umemd pull: requested pages first, the rest pushed in the background (pages after "
                       "recent faults first, holes and zero pages as hints). Exits 0 once the destination has "
                       "every page; survives the destination reconnecting or restarting.")
    p.add_argument("ramfile", type=Path, metavar="RAMFILE", help="the guest RAM file")
    add_link_options(p)
    gate = p.add_mutually_exclusive_group(required=True)
    gate.add_argument("--qmp", type=Path, metavar="SOCKET",
                      help="the source QEMU's QMP socket (a monitor of its own): read no page until its migration "
                      "reaches pre-switchover (umemd migrate turns pause-before-switchover on); abort, exit 1 and "
                      "tell the destination if the guest runs again, the migration is cancelled or fails, or "
                      "the socket is lost before that")
    gate.add_argument("--guest-stopped-for-good", action="store_true",
                      help="serve at once without QMP: you state that the source guest is stopped and will never "
                      "run again (its QEMU has quit, or RAMFILE is a copy)")
    p.add_argument("--prepage", type=positive_int, default=PREPAGE, metavar="N",
                   help=f"pages sent for each demanded page, that page first (at least 1; default {PREPAGE})")
    p.add_argument("--max-push-rate", type=float, metavar="MIB/S",
                   help="cap the background push (default: as fast as the link goes; demand is never capped)")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write what was sent here")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("migrate", help="drive one post-copy migration between two QEMUs",
                       description="Migrate a running guest to a destination QEMU whose RAM is a umem instance. "
                       "Checks that `umemd pull` answers on --dst-status and that the destination QEMU (started "
                       "with -postcopy -incoming defer) maps that instance; turns x-ignore-shared on on both "
                       "sides if -postcopy did not, and pause-before-switchover on the source; then "
                       "migrate-incoming and migrate. The source stops its guest and waits in pre-switchover; "
                       "`umemd serve RAMFILE --qmp SOCKET` (start it on the source first) releases its pages "
                       "there, and only once the pull confirms that does migrate-continue follow. After the "
                       "destination's RESUME the source QEMU is quit (it must never run again) unless "
                       "--keep-source; anything that fails before that RESUME cancels the migration, the source "
                       "guest runs on and the pull refuses its instance. Follows the pull to the last page. "
                       "Prints STOP->RESUME, the time until the last page, "
                       "pages demanded/pushed/hinted, bytes and fault latency. Starts nothing itself; exits 0 "
                       "once every page is present.")
    p.add_argument("--src-qmp", required=True, metavar="SOCKET",
                   help="the source QEMU's QMP: a Unix socket path or HOST:PORT (a monitor of its own; "
                   "umemd serve --qmp needs another)")
    p.add_argument("--dst-qmp", required=True, metavar="SOCKET",
                   help="the destination QEMU's QMP: a Unix socket path or HOST:PORT")
    p.add_argument("--dst-status", type=Endpoint.parse, required=True, metavar="HOST:PORT",
                   help="the status endpoint of the destination's umemd pull (its --status)")
    p.add_argument("--uri", required=True, metavar="URI",
                   help="where the source sends the migration stream, e.g. tcp:DESTHOST:4444")
    p.add_argument("--incoming", metavar="URI",
                   help="what the destination listens on (migrate-incoming; default: --uri itself; give "
                   "the destination's own address when the source reaches it through NAT or a forward)")
    p.add_argument("--ready-timeout", type=float, default=30, metavar="SECONDS",
                   help="how long to wait for umemd pull's status endpoint to answer (default 30)")
    p.add_argument("--release-timeout", type=float, default=120, metavar="SECONDS",
                   help="how long, after the source reaches pre-switchover, to wait for umemd serve to release "
                   "its pages (seen in the pull's status) before cancelling the migration (default 120)")
    p.add_argument("--keep-source", action="store_true",
                   help="leave the source QEMU paused after the destination guest resumes, for an orchestrator "
                   "to quit (default: quit it: it must never run again; umemd serve aborts if it does)")
    p.add_argument("--timeout", type=float, default=3600, metavar="SECONDS",
                   help="give up if the last page is not present this long after migrate (default 3600)")
    p.add_argument("--report", type=Path, metavar="FILE.json",
                   help="write the report, with the pull's status over time, here")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="plot pages present, faults per second and fault latency over time here")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("migration-id", help="print a new random migration id",
                       description="Print 16 random bytes, hex: give them to both daemons of one migration "
                       "(--migration-id). Every migration, and every retry of a failed one, needs a new id.")
    p.set_defaults(func=cmd_migration_id)

    p = sub.add_parser("keygen", help="write a new random key file",
                       description="Write 32 random bytes, hex, to FILE (mode 0600; FILE must not exist).")
    p.add_argument("file", type=Path, metavar="FILE")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("list", help="list umem instances", description="List every umem instance: its name, size "
                       "in bytes, pages present, whether a server fd is open, and its migration tag (hex).")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("stats", help="print an instance's counters", description="Print instance NAME's counters "
                       "as JSON, read from sysfs (/sys/class/umem/umem!NAME/stats; works while a pull serves it): "
                       "pages present, faults, waiters, total wait time, pages filled, zeroed and skipped.")
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
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="umemd %(threadName)s: %(message)s" if args.verbose else "umemd: %(message)s")
    if not args.verbose:  # qemu.qmp narrates its connections at INFO ("Task.Reader: end-of-file")
        logging.getLogger("qemu.qmp").setLevel(logging.WARNING)
    try:
        status: int = args.func(args)
    except ModuleNotLoadedError as e:
        log.error("%s", e)
        return EXIT_NO_MODULE
    except SourceLostError as e:
        log.error("%s", e)
        return EXIT_SOURCE_LOST
    except (UmemError, OSError) as e:
        log.error("%s", e)
        return EXIT_FAILED
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_FAILED
    return status


if __name__ == "__main__":
    sys.exit(main())
